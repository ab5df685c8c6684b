//! The response body on its way back to the workload: relayed frame by
//! frame, metered (bytes, first byte, usage), bounded by an idle timeout, and
//! accounted exactly once however it ends.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::body::{Body, Bytes, Frame};

use super::{
    account,
    context::Call,
    upstream::{BoxError, ProxyBody},
};
use crate::{
    policy::{BudgetHold, Hold},
    providers::{
        ResponseParser,
        stream_usage::UsageChunkFilter,
        tokenizer::{self, Encoding, Texts},
    },
    telemetry::{
        records::{Outcome, RequestRecord},
        redact,
    },
};

/// How long a failed stream's already-received events get to reach the
/// workload before the failure is reported (see `Metered::fail_after_flush`).
/// Long against a local flush, short against a human noticing.
const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// What to do when a response body ends: the record, and beside it the
/// call's state that is not part of the record.
pub(super) struct Finish {
    pub call: Arc<Call>,
    pub record: RequestRecord,
    /// The request's hold on its rule's limits, settled with the usage.
    pub hold: Option<Hold>,
    /// The call's reservation on its budget, settled on its cost.
    pub budget: Option<BudgetHold>,
    /// The request's text, kept for a tokenizer's estimate in case the
    /// provider reports no usage (`providers::tokenizer`).
    pub texts: Option<Texts>,
}

/// The response body on its way to the workload: relayed frame by frame (no
/// buffering), each data frame shown to the provider's usage parser, and the
/// request accounted exactly once when the body ends, fails, or is dropped
/// early (the client went away mid-stream: partial usage is still recorded).
pub(super) struct Metered {
    pub inner: ProxyBody,
    /// Fires when the provider sends nothing for `idle_timeout`; reset by each frame.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    /// An error to report on the next poll (see `fail_after_flush`).
    deferred_error: Option<BoxError>,
    bytes: u64,
    first_byte: Option<Duration>,
    started: Instant,
    parser: Option<ResponseParser>,
    /// Takes out of the stream what asking for usage added (see
    /// `providers::stream_usage`); the parser still sees the provider's bytes.
    filter: Option<UsageChunkFilter>,
    /// The provider's body has ended; what the filter held is being sent.
    drained: bool,
    /// The client went away before the response headers (see
    /// `client_gone_before_headers`).
    gone_before_headers: bool,
    /// The body's first bytes, for `audit.capture.bodies`.
    capture: Option<Vec<u8>>,
    capture_max: usize,
    finish: Option<Finish>,
}

impl Metered {
    pub fn new(
        inner: ProxyBody,
        started: Instant,
        parser: ResponseParser,
        filter: Option<UsageChunkFilter>,
        finish: Finish,
    ) -> Self {
        let tls = &finish.call.tls;
        let idle_timeout = tls.settings.stream_idle_timeout;
        let capture = tls.capture.bodies.then(Vec::new);
        if finish.record.stream {
            finish.call.metrics.active_streams.inc();
        }
        Self {
            inner,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            deferred_error: None,
            bytes: 0,
            first_byte: None,
            started,
            parser: Some(parser),
            filter,
            drained: false,
            gone_before_headers: false,
            capture,
            capture_max: tls.capture.max_body_bytes,
            finish: Some(finish),
        }
    }

    /// Report `e` only after a short grace. When a body fails, hyper resets
    /// the stream (h2) or drops the connection (h1), and frames still queued
    /// for the workload are discarded; when the provider's last events and
    /// its failure arrive together, the workload would lose events it is
    /// owed. The grace lets the connection flush them first.
    fn fail_after_flush(
        &mut self,
        e: BoxError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.deferred_error = Some(e);
        let deadline = tokio::time::Instant::now() + FLUSH_GRACE;
        self.idle.as_mut().reset(deadline);
        // Register the timer with this task so it wakes us.
        let _ = self.idle.as_mut().poll(cx);
        Poll::Pending
    }

    /// The client went away while the provider was preparing its answer.
    /// The provider bills a JSON answer whole whether or not anyone reads
    /// it, so it is read to its end (up to the parser's bound) for the
    /// exact usage; a stream is closed at once (the provider stops
    /// generating) and recorded with an estimate. Recorded as
    /// `client_disconnected` either way.
    pub async fn client_gone_before_headers(mut self) {
        self.gone_before_headers = true;
        if self.finish.as_ref().is_none_or(|f| f.record.stream) {
            return; // dropped here: recorded with the estimate
        }
        while self.bytes <= super::super::providers::MAX_JSON_BODY as u64 {
            match std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    }

    /// One data frame from the provider: metered, parsed and captured as it
    /// came; returns what the workload gets (the filter's output, which at
    /// the body's `end` includes whatever it held).
    fn observe(&mut self, d: Bytes, end: bool) -> Bytes {
        if self.first_byte.is_none() && !d.is_empty() {
            self.first_byte = Some(self.started.elapsed());
        }
        self.bytes += d.len() as u64;
        if let Some(p) = self.parser.as_mut() {
            p.feed(&d);
        }
        let max = self.capture_max;
        if let Some(c) = self.capture.as_mut().filter(|c| c.len() < max) {
            c.extend_from_slice(&d[..d.len().min(max - c.len())]);
        }
        let Some(f) = self.filter.as_mut() else {
            return d;
        };
        let out = f.feed(d);
        if !end || !f.holds() {
            return out;
        }
        let mut all = out.to_vec();
        all.extend_from_slice(&f.finish());
        Bytes::from(all)
    }

    fn finish(&mut self, mut result: Outcome, error: Option<String>) {
        let Some(Finish {
            call,
            mut record,
            hold,
            budget,
            mut texts,
        }) = self.finish.take()
        else {
            return;
        };
        if let Some(p) = self.parser.take() {
            let info = p.finish();
            record.usage = info.usage;
            record.provider_usage = info.provider_usage;
            record.response_model = info.response_model;
            // SDKs stop reading at the stream's end marker (`[DONE]`) and may
            // close before the transport's end of body: that call completed.
            if result == Outcome::ClientDisconnected && info.complete {
                result = Outcome::Ok;
            }
            match (texts.as_mut(), info.text) {
                (Some(t), Some(output)) => {
                    t.output = output;
                    t.output_chars = info.text_chars;
                }
                _ => texts = None, // usage came: nothing to estimate
            }
        }
        let mut error = error;
        if self.gone_before_headers && result == Outcome::Ok {
            result = Outcome::ClientDisconnected;
            error = Some("the client went away before the response headers; the provider's answer was read for its usage".into());
        } else if self.gone_before_headers && error.is_none() {
            error = Some("the client went away before the response headers".into());
        }
        record.response_bytes = self.bytes;
        if let Some(c) = self.capture.take() {
            record.response_body = Some(redact::body_prefix(&c, self.bytes, self.capture_max));
        }
        if record.stream {
            call.metrics.active_streams.dec();
        }
        record.ttft_ms = self.first_byte.map_or(0, |d| d.as_millis() as u64);
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        record.result = result;
        record.error = error;
        let estimate = texts.and_then(|t| {
            let model = record
                .response_model
                .as_deref()
                .or(record.routed_model.as_deref())
                .or(record.model.as_deref())?;
            Some((Encoding::for_model(call.meta.adapter.api(), model)?, t))
        });
        let settled = Settle {
            call,
            record,
            hold,
            budget,
            started: self.started,
            first_byte: self.first_byte,
        };
        match (estimate, tokio::runtime::Handle::try_current()) {
            // Counting may load the encoding (200 ms): never on the data path.
            (Some((enc, texts)), Ok(rt)) => {
                rt.spawn_blocking(move || {
                    settled.run(tokenizer::estimate(enc, &texts).map(|c| (enc, c)))
                });
            }
            _ => settled.run(None),
        }
    }
}

/// The last step of a call, once its usage is known: its holds settled on
/// the usage, then priced, charged, counted and logged (`account`).
struct Settle {
    call: Arc<Call>,
    record: RequestRecord,
    hold: Option<Hold>,
    budget: Option<BudgetHold>,
    started: Instant,
    first_byte: Option<Duration>,
}

impl Settle {
    /// `counted`: a tokenizer's estimate, replacing the character estimate.
    fn run(mut self, counted: Option<(Encoding, tokenizer::Counted)>) {
        if let Some((enc, c)) = counted {
            let u = &mut self.record.usage;
            u.input_tokens = c.input_tokens;
            u.output_tokens = c.output_tokens;
            u.estimated_with = Some(enc.name());
        }
        let u = &self.record.usage;
        if let Some(a) = self.hold {
            a.settle(u.input_tokens, u.output_tokens);
        }
        account::account(
            &self.call,
            self.record,
            self.budget,
            self.started,
            self.first_byte,
        );
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.deferred_error.is_some() {
            // Waiting out the flush grace (see fail_after_flush).
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(self.deferred_error.take().map(Err));
        }
        if self.drained {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + self.idle_timeout;
                    self.idle.as_mut().reset(deadline);
                    let ended = self.inner.is_end_stream();
                    let frame = match frame.into_data() {
                        Ok(d) => {
                            let d = self.observe(d, ended);
                            if d.is_empty() && !ended {
                                continue; // all held or taken out: nothing to send yet
                            }
                            Frame::data(d)
                        }
                        Err(frame) => frame,
                    };
                    // hyper stops polling once a body says it has ended (e.g. a
                    // content-length body whose last byte just came), so "ended"
                    // must be noticed here, not only at a final None.
                    if ended {
                        self.finish(Outcome::Ok, None);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.finish(Outcome::UpstreamError, Some(e.to_string()));
                    return self.fail_after_flush(e, cx);
                }
                Poll::Ready(None) => {
                    self.finish(Outcome::Ok, None);
                    // An unterminated last event the filter held: sent as it is.
                    let rest = self.filter.as_mut().map(UsageChunkFilter::finish);
                    if let Some(rest) = rest.filter(|r| !r.is_empty()) {
                        self.drained = true;
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if self.idle.as_mut().poll(cx).is_ready() {
                        // A provider that stops mid-stream would hold the workload
                        // forever: end the stream with an error, keep the usage seen.
                        let msg = format!("provider sent nothing for {:?}", self.idle_timeout);
                        self.finish(Outcome::UpstreamIdleTimeout, Some(msg.clone()));
                        return self.fail_after_flush(msg.into(), cx);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.drained
            || (self.inner.is_end_stream()
                && !self.filter.as_ref().is_some_and(UsageChunkFilter::holds))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.filter.is_some() {
            return hyper::body::SizeHint::default(); // the filter changes the length
        }
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Dropped before the end: the client stopped reading.
        self.finish(Outcome::ClientDisconnected, None);
    }
}
