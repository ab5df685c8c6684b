//! One admission point per request: parse → rule → rewrites → credential →
//! budget → limits, in that order, in one place. The proxy hands a request
//! in and gets `Admitted` (what to send, and the call's hold on its limits
//! and budget) or a `Refusal` (why not), which it turns into the
//! provider-shaped answer in one place of its own (`proxy::rescue`).
//!
//! The order is the policy's, not the proxy's: a denied model is refused
//! before anything is reserved, a budget is checked before limit tokens are
//! taken (a refused call must not hold tokens), and the credential is read
//! before either (a rule whose key is missing refuses without charging).
use std::sync::Arc;

use http::HeaderMap;
use hyper::body::Bytes;

use super::{
    Policy, RequestDecision, Subject,
    budgets::{BudgetKey, Exhausted},
    credentials::{self, Credentials},
    failover::FailoverChain,
    gate::{Hold, LimitStore},
    limits::{Estimate, LimitKey, Limited, LimitsConfig},
    sigv4,
    spend::{BudgetHold, BudgetStore},
    token_exchange::{self, TokenExchange},
};
use crate::{
    identity::Workload,
    pricing::{self, PriceTable},
    providers::{self, Adapter, RequestInfo, Upstream, Usage, rewrite},
};

/// Output tokens reserved against a token limit for a request that names no
/// output limit: a typical chat answer; settled with the real count after.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 1024;

/// The state admission keeps across calls: limit buckets, budget spend and
/// provider keys (each kept across policy reloads).
pub struct Enforcer {
    pub limits: Arc<LimitStore>,
    pub budgets: Arc<BudgetStore>,
    pub credentials: Credentials,
    /// Tokens for credential files that are exchanged (service accounts).
    pub tokens: Arc<TokenExchange>,
}

/// One request up for admission.
pub struct Candidate<'a> {
    /// The call's id (its audit record's): names its budget reservation.
    pub id: &'a str,
    /// The HTTP method (a re-signed Bedrock call signs it).
    pub method: &'a str,
    pub subject: Subject<'a>,
    /// Where it goes (provider name and TLS server name).
    pub to: Upstream<'a>,
    pub adapter: &'static dyn Adapter,
    /// Ask streams that did not ask for usage to report it
    /// (`providers[].stream_usage`).
    pub asks_stream_usage: bool,
    /// Path and query, unredacted.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// A message to an MCP server: the tools its `tools/call`s name (none
    /// for other messages). The rules' `mcp` decide it, and a rule's limits
    /// count each tool's calls on their own.
    pub mcp_tools: Option<Vec<String>>,
}

/// What the request turned out to be, known whether it is admitted or not
/// (the audit record has it either way).
#[derive(Debug, Default)]
pub struct Seen {
    pub info: RequestInfo,
    /// Characters of input text, for estimates.
    pub input_chars: u64,
    /// The deciding rule (`rule:<name>`, `default`); empty when the request
    /// was refused before a rule was consulted.
    pub reason: String,
    /// A file upload's form (`/v1/files`): its purpose, size and the models
    /// its JSONL names, which model rules decide it by.
    pub batch_input: Option<providers::batch_input::BatchInput>,
}

/// A request to send: rewritten, with its credential, and holding its
/// reservations (settled with the usage when the response ends).
pub struct Admitted {
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The model now sent, when an alias rewrote it.
    pub routed_model: Option<String>,
    /// The cap, when it lowered or set the request's output limit.
    pub capped_output_tokens: Option<u64>,
    /// The stream was made to ask for its usage: the response filter takes
    /// what that adds back out.
    pub asked_stream_usage: bool,
    pub credential_injected: bool,
    pub failover: Option<Arc<FailoverChain>>,
    /// The call's reservation on its budget, settled on its cost.
    pub budget: Option<BudgetHold>,
    /// The call's hold on its rule's limits.
    pub hold: Option<Hold>,
    /// How to admit the call again under its rule's limits, for a call
    /// that spends in parts (a Realtime session, response by response).
    pub renewal: Option<LimitRenewal>,
}

/// A rule's limits and the key a call counts under.
#[derive(Debug, Clone)]
pub struct LimitRenewal {
    /// `rule:<name>`.
    pub rule: String,
    key: String,
    limits: LimitsConfig,
}

/// Why a request is not sent. Each has one answer (`proxy::rescue`).
#[derive(Debug)]
pub enum Refusal {
    /// Larger than `tls.max_request_body` (found while reading it).
    BodyTooLarge {
        limit: usize,
    },
    /// Reading the body failed (the client went away, a broken stream).
    BodyUnreadable {
        error: String,
    },
    /// The body did not arrive within `tls.request_body_timeout`.
    BodyTimeout {
        after: std::time::Duration,
    },
    /// The node holds `tls.max_buffered_bytes` of request bodies already.
    Overloaded {
        limit: usize,
    },
    /// Declares a JSON body but sent none, or no valid JSON: the provider
    /// would reject it, and HTTP/2 reports a stream the client reset
    /// (CANCEL) as a body that simply ended — forwarding it would make a
    /// flood of reset streams into billed provider calls.
    NotJson {
        empty: bool,
    },
    /// A rule denies it.
    Denied {
        rule: String,
        message: String,
    },
    /// Larger than the rule's `max_request_bytes`.
    OverRuleSize {
        rule: String,
        size: usize,
        max: usize,
    },
    /// The rule's provider key cannot be read.
    CredentialUnavailable {
        rule: String,
    },
    BudgetSpent {
        rule: String,
        spent: Exhausted,
    },
    /// The rule has a budget and the price table cannot price the model:
    /// it would spend without being counted.
    Unpriced {
        rule: String,
        provider: String,
        model: Option<String>,
    },
    RateLimited {
        rule: String,
        limited: Limited,
    },
    /// The rule changes a call the workload signed with AWS SigV4 (Bedrock)
    /// and holds no key to send instead: AWS would refuse the signature.
    Unsignable {
        rule: String,
        /// What the rule would change (`routes it to model …`).
        change: String,
    },
}

impl Enforcer {
    pub fn new(limits: Arc<LimitStore>, budgets: Arc<BudgetStore>) -> Self {
        Self {
            limits,
            budgets,
            credentials: Credentials::default(),
            tokens: Arc::default(),
        }
    }

    /// The key a limit or budget with `per` counts `workload` under.
    pub fn key_for(workload: &Workload, per: LimitKey) -> String {
        match per {
            LimitKey::Workload => match &workload.kubernetes {
                Some(k) => format!("{}/{}", k.namespace, k.workload),
                None => workload.label().to_string(),
            },
            LimitKey::Namespace => match &workload.kubernetes {
                Some(k) => format!("namespace:{}", k.namespace),
                None => workload.label().to_string(),
            },
            LimitKey::Pod => workload
                .pod_uid
                .clone()
                .unwrap_or_else(|| workload.label().to_string()),
            LimitKey::Global => String::new(),
        }
    }

    /// Put the credential of a rule's or a failover target's
    /// `credential_file` on a call sent `to` its provider, in place of the
    /// workload's: a key as the provider's header (`credentials`); for
    /// Bedrock, AWS keys as a new SigV4 signature for that endpoint and
    /// region (`sigv4`); an exchanged credential as its current token
    /// (`token_exchange`). A target's file is its own, so it only ever
    /// reaches the provider it was given for.
    #[allow(clippy::too_many_arguments)]
    pub async fn credential(
        &self,
        adapter: &dyn Adapter,
        to: Upstream<'_>,
        file: &std::path::Path,
        method: &str,
        target: &mut String,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let key = self.credentials.get(file).map_err(|e| e.to_string())?;
        let text = key.text();
        if let Some(kind) = token_exchange::exchanged(text) {
            let token = self
                .tokens
                .token(file, text, kind)
                .await
                .map_err(|e| format!("{}: {e}", file.display()))?;
            match kind.token_use() {
                // Entra tokens are bearer tokens, also where the provider's
                // own key would go in `api-key` (Azure OpenAI).
                token_exchange::TokenUse::Bearer => {
                    *target = credentials::remove(headers, target);
                    credentials::insert_bearer(headers, &token);
                }
                // Temporary AWS keys: they sign the call, below.
                token_exchange::TokenUse::AwsKeys => {
                    return self.sign(
                        adapter,
                        to,
                        file,
                        token.text(),
                        method,
                        target,
                        headers,
                        body,
                    );
                }
                token_exchange::TokenUse::ProviderKey => {
                    *target = credentials::inject(adapter, to, headers, target, &token);
                }
            }
            return Ok(());
        }
        if !sigv4::is_aws_keys(text) {
            *target = credentials::inject(adapter, to, headers, target, &key);
            return Ok(());
        }
        self.sign(adapter, to, file, text, method, target, headers, body)
    }

    /// Sign a Bedrock call with the AWS keys `keys` (JSON) from `file`.
    #[allow(clippy::too_many_arguments)]
    fn sign(
        &self,
        adapter: &dyn Adapter,
        to: Upstream<'_>,
        file: &std::path::Path,
        keys: &str,
        method: &str,
        target: &str,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        if adapter.api() != providers::Api::Bedrock {
            return Err(format!(
                "{} holds AWS credentials, which sign Bedrock calls only; this call goes to {}",
                file.display(),
                to.provider
            ));
        }
        let keys = sigv4::parse(keys).map_err(|e| format!("{}: {e}", file.display()))?;
        let now = std::time::SystemTime::now();
        sigv4::sign_request(&keys, to.host, method, target, headers, body, now)
            .map_err(|e| e.to_string())
    }

    /// Admit `req` under `policy`, pricing budgeted calls with `prices`.
    /// `seen` is filled as far as admission got.
    pub async fn admit(
        &self,
        policy: &Policy,
        prices: &PriceTable,
        req: Candidate<'_>,
        seen: &mut Seen,
    ) -> Verdict {
        let Candidate {
            id,
            method,
            subject,
            to,
            adapter,
            asks_stream_usage,
            mut target,
            mut headers,
            mut body,
            mcp_tools,
        } = req;
        // Parsed once: the adapter, the input size and the output limit read it.
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let declares_json = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        if declares_json && json.is_none() {
            return Err(Refusal::NotJson {
                empty: body.is_empty(),
            });
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        seen.info = adapter.request(path, query, json.as_ref());
        seen.input_chars = json.as_ref().map_or(0, providers::input_chars);
        let asked_output = json.as_ref().and_then(providers::output_limit);
        let ask_usage = json
            .as_ref()
            .filter(|_| asks_stream_usage)
            .and_then(|j| adapter.stream_usage(to, path, query, j));
        let upload = json.is_none() && seen.info.operation == providers::Operation::Files;
        drop(json);
        if upload {
            let ct = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            seen.batch_input = providers::batch_input::read(ct, body.clone()).await;
        }
        // An upload whose lines all name a model is decided by those models.
        let models = seen
            .batch_input
            .as_ref()
            .and_then(|b| b.decidable_models())
            .filter(|_| seen.info.model.is_none());
        let decision = match (&mcp_tools, models) {
            (Some(tools), _) => mcp_decision(policy, subject, to.provider, tools),
            (None, Some(models)) => {
                policy.request_each(subject, to.provider, seen.info.operation, models)
            }
            (None, None) => policy.request(
                subject,
                to.provider,
                seen.info.operation,
                seen.info.model.as_deref(),
            ),
        };
        let caps = match decision {
            RequestDecision::Deny { reason, message } => {
                seen.reason = reason.clone();
                return Err(Refusal::Denied {
                    rule: reason,
                    message,
                });
            }
            RequestDecision::Allow { reason, caps } => {
                seen.reason = reason;
                caps
            }
        };
        let rule = &seen.reason;
        let (path, rewritten, changed) = rewrite::apply(
            adapter,
            to,
            &target,
            &body,
            caps.model.as_deref(),
            caps.max_output_tokens,
            ask_usage,
        );
        target = path;
        if let Some(b) = rewritten {
            body = Bytes::from(b);
        }
        if let Some(max) = caps.max_request_bytes.filter(|m| body.len() > *m) {
            return Err(Refusal::OverRuleSize {
                rule: rule.clone(),
                size: body.len(),
                max,
            });
        }
        if let Some(h) = &caps.headers {
            h.apply(&mut headers);
        }
        let credential_injected = match &caps.credential_file {
            None => false,
            Some(file) => {
                let injected = self
                    .credential(adapter, to, file, method, &mut target, &mut headers, &body)
                    .await;
                if let Err(e) = injected {
                    tracing::error!(rule = %rule, error = %e, "credential injection failed; the call is refused");
                    return Err(Refusal::CredentialUnavailable { rule: rule.clone() });
                }
                true
            }
        };
        // A Bedrock call the workload signed (SigV4) must reach AWS as it
        // was signed: a rewrite of its path or body, or of a header the
        // signature covers, would make AWS refuse it. Refused here with
        // what to do, unless the rule's key replaced the signature.
        if adapter.api() == providers::Api::Bedrock
            && !credential_injected
            && let Some(signed) = providers::bedrock::signed_headers(&headers)
        {
            let header_edit = caps.headers.as_ref().and_then(|h| {
                h.remove
                    .iter()
                    .chain(h.set.keys())
                    .map(|n| n.to_ascii_lowercase())
                    .find(|n| signed.contains(n))
            });
            let change = match (&changed.model, changed.capped_output_tokens, header_edit) {
                (Some(m), _, _) => Some(format!("routes it to model `{m}`")),
                (_, Some(cap), _) => Some(format!("caps its output at {cap} tokens")),
                (_, _, Some(h)) => Some(format!("edits its signed header `{h}`")),
                _ => None,
            };
            if let Some(change) = change {
                return Err(Refusal::Unsignable {
                    rule: rule.clone(),
                    change,
                });
            }
        }
        // What the call may use: its input from the text size, its output
        // up to the limit it asks for (a cap the policy applied replaces
        // what the request asked). Limits and budgets reserve this.
        let est = match &mcp_tools {
            // An MCP call spends no tokens; its limits count calls.
            Some(_) => Estimate::default(),
            None => Estimate {
                input_tokens: providers::estimated_tokens(seen.input_chars),
                output_tokens: changed
                    .capped_output_tokens
                    .or(asked_output)
                    .unwrap_or(DEFAULT_OUTPUT_ESTIMATE),
            },
        };
        // An MCP rule's limits count tool calls, each tool on its own;
        // the protocol's other messages (listings, notifications) are free.
        let limits = match &mcp_tools {
            Some(tools) if tools.is_empty() => None,
            _ => caps.limits,
        };
        let budget = match caps.budget {
            None => None,
            Some(config) => {
                let model = changed.model.clone().or_else(|| seen.info.model.clone());
                let Some(price) = model.as_deref().and_then(|m| prices.price(to.provider, m))
                else {
                    return Err(Refusal::Unpriced {
                        rule: rule.clone(),
                        provider: to.provider.to_string(),
                        model,
                    });
                };
                let worst = pricing::cost(
                    price,
                    &Usage {
                        input_tokens: est.input_tokens,
                        output_tokens: est.output_tokens,
                        ..Default::default()
                    },
                );
                let b = BudgetKey {
                    rule: rule.clone(),
                    key: Self::key_for(subject.workload, config.per),
                    config,
                };
                let now = time::OffsetDateTime::now_utc();
                match self.budgets.reserve(&b, id, worst, now).await {
                    Ok(hold) => Some(hold),
                    Err(spent) => {
                        return Err(Refusal::BudgetSpent {
                            rule: rule.clone(),
                            spent,
                        });
                    }
                }
            }
        };
        let (hold, renewal) = match limits {
            None => (None, None),
            Some(limits) => {
                let mut key = Self::key_for(subject.workload, limits.per);
                if let Some(tools) = &mcp_tools {
                    key.push_str("\u{1f}tool:");
                    key.push_str(&tools.join(","));
                }
                match self.limits.admit(rule, &key, &limits, est).await {
                    Ok(hold) => (
                        Some(hold),
                        Some(LimitRenewal {
                            rule: rule.clone(),
                            key,
                            limits,
                        }),
                    ),
                    Err(limited) => {
                        return Err(Refusal::RateLimited {
                            rule: rule.clone(),
                            limited,
                        });
                    }
                }
            }
        };
        Ok(Admitted {
            target,
            headers,
            body,
            routed_model: changed.model,
            capped_output_tokens: changed.capped_output_tokens,
            asked_stream_usage: changed.asked_stream_usage,
            credential_injected,
            failover: caps.failover,
            budget,
            hold,
            renewal,
        })
    }

    /// Admit the next part of a call again under its rule's limits (one
    /// more request; its output reserved as for a call that names none).
    pub async fn readmit(&self, r: &LimitRenewal) -> Result<Hold, Limited> {
        let est = Estimate {
            input_tokens: 0,
            output_tokens: DEFAULT_OUTPUT_ESTIMATE,
        };
        self.limits.admit(&r.rule, &r.key, &r.limits, est).await
    }
}

pub type Verdict = Result<Admitted, Refusal>;

/// The decision for an MCP message naming `tools` (its `tools/call`s):
/// refused when any tool is; the rule that decides does not depend on the
/// tool, so any allowed answer is the same.
fn mcp_decision(
    policy: &Policy,
    subject: Subject<'_>,
    server: &str,
    tools: &[String],
) -> RequestDecision {
    tools
        .iter()
        .map(|t| policy.mcp(subject, server, Some(t)))
        .find(|d| matches!(d, RequestDecision::Deny { .. }))
        .unwrap_or_else(|| policy.mcp(subject, server, None))
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
