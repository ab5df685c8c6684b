//! Workloads that reject the node CA. A client whose TLS stack does not
//! trust the node CA answers the leaf certificate with an alert (unknown
//! CA, bad certificate). Terminating again would break it again, so the
//! (workload, host) pair is remembered and its next connections are relayed
//! untouched (observe: server name, bytes, workload — deny rules still
//! close them) until `tls.ca_rejected_retry` passes and termination is
//! tried once more (the workload may trust the CA by then).
//!
//! With `tls.on_ca_rejected: terminate` nothing is remembered: such
//! workloads keep failing, which is what a platform that requires
//! termination (limits, budgets, model rules) wants.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use rustls::AlertDescription;

/// Pairs remembered at most; beyond, the oldest are forgotten.
const MAX_ENTRIES: usize = 10_000;

pub struct Distrust {
    seen: Mutex<HashMap<(String, String), Instant>>,
    retry: Duration,
}

impl Distrust {
    pub fn new(retry: Duration) -> Self {
        Self {
            seen: Mutex::default(),
            retry,
        }
    }

    /// Did the client reject our certificate (as opposed to any other failure)?
    pub fn is_rejection(e: &std::io::Error) -> bool {
        let Some(rustls::Error::AlertReceived(alert)) =
            e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        else {
            return false;
        };
        matches!(
            alert,
            AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
        )
    }

    /// Remember that `cgroup` rejected the certificate for `host`; true the
    /// first time (so the caller logs once).
    pub fn mark(&self, cgroup: &str, host: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_ENTRIES {
            let now = Instant::now();
            seen.retain(|_, until| *until > now);
            if seen.len() >= MAX_ENTRIES {
                seen.clear();
            }
        }
        seen.insert((cgroup.into(), host.into()), Instant::now() + self.retry)
            .is_none()
    }

    /// Relay instead of terminating `cgroup`'s connections to `host`?
    pub fn is_distrusted(&self, cgroup: &str, host: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (cgroup.to_string(), host.to_string());
        match seen.get(&key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                seen.remove(&key);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_retry() {
        let d = Distrust::new(Duration::from_millis(50));
        assert!(!d.is_distrusted("/pod", "api.openai.com"));
        assert!(d.mark("/pod", "api.openai.com"), "first time");
        assert!(!d.mark("/pod", "api.openai.com"), "logged once");
        assert!(d.is_distrusted("/pod", "api.openai.com"));
        assert!(!d.is_distrusted("/pod", "api.anthropic.com"), "per host");
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !d.is_distrusted("/pod", "api.openai.com"),
            "tried again after the retry time"
        );
    }

    #[test]
    fn only_certificate_alerts_count() {
        let alert = |a| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            )
        };
        assert!(Distrust::is_rejection(&alert(AlertDescription::UnknownCA)));
        assert!(Distrust::is_rejection(&alert(
            AlertDescription::BadCertificate
        )));
        assert!(!Distrust::is_rejection(&alert(
            AlertDescription::ProtocolVersion
        )));
        assert!(!Distrust::is_rejection(&std::io::Error::other("reset")));
    }
}
