//! Pointing an error at its line in the YAML text.

/// Line (1-based) where the last key of a dotted field path appears, found by
/// walking the keys in order. YAML values carry no positions after
/// deserialisation, so this is a best-effort text search; it is only used to
/// point a human at the right line of an error.
pub(super) fn line_of(text: &str, field: &str) -> Option<usize> {
    // Hand-written on purpose: serde_yaml reports positions only for syntax
    // and type errors, not for what `validate` finds; this walks the field
    // path (`policy.rules[1].name`) over the text, block and flow style.
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut start, mut found) = (0, None);
    for seg in field.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if key.is_empty() {
            continue;
        }
        let pat = format!("{key}:");
        let idx = (start..lines.len()).find(|&i| {
            let l = lines[i].trim_start().trim_start_matches("- ");
            l.starts_with(&pat)
                || l.contains(&format!("{{{pat}"))
                || l.contains(&format!(", {pat}"))
        })?;
        let mut at = idx;
        start = idx + 1;
        if let Some(n) = index {
            // The n-th `- ` item of the list under the key.
            let key_indent = indent(lines[idx]);
            let items: Vec<usize> = (idx + 1..lines.len())
                .take_while(|&i| {
                    let l = lines[i];
                    l.trim().is_empty()
                        || indent(l) > key_indent
                        || (indent(l) == key_indent && l.trim_start().starts_with("- "))
                })
                .filter(|&i| lines[i].trim_start().starts_with("- "))
                .collect();
            let item_indent = items.first().map(|&i| indent(lines[i]));
            let items: Vec<usize> = items
                .into_iter()
                .filter(|&i| Some(indent(lines[i])) == item_indent)
                .collect();
            if let Some(&i) = items.get(n) {
                at = i;
                start = i; // the item's first key may sit on its own line
            }
        }
        found = Some(at + 1);
    }
    found
}
