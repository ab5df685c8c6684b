//! The config and policy loader over arbitrary text: never panics; every
//! error names a field; a config it accepts builds a policy (the loader's
//! validation and the policy compiler agree).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::{config::Config, policy::Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.yaml") {
        Ok(cfg) => {
            let providers: Vec<String> = cfg.providers.iter().map(|p| p.name.clone()).collect();
            Policy::new(&cfg.policy, &providers).expect("an accepted config compiles");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
