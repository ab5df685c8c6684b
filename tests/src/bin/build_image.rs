//! `tollgate-build-image BINARY TAG WORKDIR`: build the agent's container
//! image (see `tollgate_tests::image`); `cargo xtask image` runs it.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [binary, tag, work] = args.as_slice() else {
        eprintln!("usage: tollgate-build-image BINARY TAG WORKDIR");
        std::process::exit(2)
    };
    std::fs::create_dir_all(work).expect("create the work directory");
    match tollgate_tests::image::build(binary.as_ref(), tag, work.as_ref()) {
        Ok(()) => println!("built {tag} from {binary}"),
        Err(e) => {
            eprintln!("building the image: {e}");
            std::process::exit(1)
        }
    }
}
