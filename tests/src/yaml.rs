//! YAML helpers for test configs and chart values.

/// `extra` YAML deep-merged over `base` YAML (mappings merge, other values replace).
pub fn merge_yaml(base: &str, extra: &str) -> String {
    fn merge(a: &mut serde_yaml::Value, b: serde_yaml::Value) {
        match (a, b) {
            (serde_yaml::Value::Mapping(a), serde_yaml::Value::Mapping(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(slot) => merge(slot, v),
                        None => {
                            a.insert(k, v);
                        }
                    }
                }
            }
            (a, b) => *a = b,
        }
    }
    let mut v: serde_yaml::Value = serde_yaml::from_str(base).expect("base config is YAML");
    if !extra.trim().is_empty() {
        merge(
            &mut v,
            serde_yaml::from_str(extra).expect("extra config is YAML"),
        );
    }
    serde_yaml::to_string(&v).expect("YAML serialises")
}
