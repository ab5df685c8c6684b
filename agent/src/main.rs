//! The `tollgate` binary: parse the command line, set up logging, hand over.
use std::process::ExitCode;

use clap::Parser;
use tollgate_agent::cli::{Cli, Command, LogFormat, load_config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = load_config(config.as_deref())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(tollgate_agent::run::run(config))
        }
        Command::CheckConfig { file } => {
            let config = load_config(Some(&file))?;
            println!("{}: valid", file.display());
            print!("{}", serde_yaml::to_string(&config)?);
            Ok(())
        }
        Command::Detach { bpffs_dir } => {
            let n = tollgate_agent::bpf::detach_pinned(&bpffs_dir);
            println!(
                "removed {n} pinned program set(s) from {}",
                bpffs_dir.display()
            );
            Ok(())
        }
    }
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
