//! The `tollgate` binary: parse the command line, set up logging, hand over.
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tollgate_agent::cli::{CaCommand, Cli, Command, LogFormat, PolicyCommand, load_config};

/// mimalloc instead of glibc's malloc: a call allocates and frees many
/// small buffers across threads (hyper, rustls, serde), where glibc's
/// arenas spent about 15 % of the agent's CPU at saturation (`cargo xtask
/// bench`, README "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            let config_path = config.clone();
            let config = load_config(config.as_deref())?;
            // The control plane's thread; the proxy threads (`workers`) have
            // runtimes of their own.
            current_thread()?.block_on(tollgate_agent::run::run(config, config_path))
        }
        Command::CheckConfig { file } => {
            let config = load_config(Some(&file))?;
            println!("{}: valid", file.display());
            for (field, message) in config.policy.warnings() {
                eprintln!("warning: policy.{field}: {message}");
            }
            print!("{}", serde_yaml::to_string(&config)?);
            Ok(())
        }
        Command::Ca(CaCommand::Init {
            dir,
            common_name,
            force,
        }) => {
            let ca = tollgate_agent::tls::NodeCa::init(&dir, &common_name, force)?;
            println!(
                "created {}/{} (0644) and {}/{} (0600, keep it secret)",
                dir.display(),
                tollgate_agent::tls::ca::CERT_FILE,
                dir.display(),
                tollgate_agent::tls::ca::KEY_FILE
            );
            println!(
                "workloads trust it through SSL_CERT_FILE / REQUESTS_CA_BUNDLE / NODE_EXTRA_CA_CERTS:"
            );
            print!("{}", ca.cert_pem());
            Ok(())
        }
        Command::Ca(CaCommand::Check { dir }) => {
            let ca = tollgate_agent::tls::NodeCa::load(&dir)?;
            println!("{}: valid CA, key permissions ok", dir.display());
            print!("{}", ca.cert_pem());
            Ok(())
        }
        Command::Policy(PolicyCommand::Schema) => {
            let schema = schemars::schema_for!(tollgate_agent::config::Config);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(())
        }
        Command::Status {
            addr,
            json,
            token_file,
        } => {
            let token = read_token(token_file)?;
            let rt = current_thread()?;
            let body = rt.block_on(tollgate_agent::status::fetch(addr, token.as_deref()))?;
            if json {
                println!("{body}");
            } else {
                print!("{}", tollgate_agent::status::render(&body)?);
            }
            Ok(())
        }
        Command::Top {
            addr,
            token_file,
            interval,
            once,
        } => {
            let token = read_token(token_file)?;
            let rt = current_thread()?;
            rt.block_on(tollgate_agent::top::run(
                addr,
                token.as_deref(),
                interval,
                once,
            ))?;
            Ok(())
        }
        Command::Pricing {
            config,
            model,
            provider,
        } => {
            let config = load_config(config.as_deref())?;
            let table = tollgate_agent::pricing::PriceTable::new(&config.pricing)
                .map_err(|(i, e)| anyhow::anyhow!("pricing.models[{i}]: {e}"))?;
            match model {
                Some(m) => print!("{}", table.explain(&provider, &m)),
                None => print!("{}", table.listing()),
            }
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

/// A one-thread runtime for the commands that ask a running agent.
fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The bearer token in `file`, trimmed.
fn read_token(file: Option<std::path::PathBuf>) -> anyhow::Result<Option<String>> {
    file.map(|p| {
        std::fs::read_to_string(&p)
            .map(|t| t.trim().to_string())
            .with_context(|| format!("reading the token file {}", p.display()))
    })
    .transpose()
}

fn init_logging(cli: &Cli) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !cli.log.contains("kube_client") {
        // kube-rs logs every failed API call at error level; the pod watch
        // reports failures itself, once per outage, with a hint.
        filter = filter.add_directive("kube_client=off".parse().expect("valid directive"));
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Escape codes only where a person reads them: never into a file,
        // a pipe or a container runtime's log.
        .with_ansi(terminal);
    match cli.log_format.resolve(terminal) {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text | LogFormat::Auto => builder.init(),
    }
}
