//! `tollgate-render-chart [VALUES.yaml]`: print deploy/helm/tollgate rendered
//! as release `tollgate` in namespace `tollgate-system`, with the chart's
//! values overridden by VALUES.yaml if given (what `helm template` would
//! print; see `tollgate_tests::chart` for why not helm itself).
//! `cargo xtask manifests` writes the default rendering to
//! deploy/manifests/tollgate.yaml.
fn main() {
    let overrides = match std::env::args().nth(1) {
        Some(p) => std::fs::read_to_string(&p).unwrap_or_else(|e| {
            eprintln!("cannot read {p}: {e}");
            std::process::exit(2)
        }),
        None => String::new(),
    };
    let chart = tollgate_tests::chart::chart_dir();
    match tollgate_tests::chart::render(&chart, "tollgate", "tollgate-system", &overrides) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("rendering {}: {e}", chart.display());
            std::process::exit(1)
        }
    }
}
