//! The `gatehouse` binary: parses the command line and the process
//! configuration, then wires the control plane, the data plane or both
//! (standalone) and runs them until a shutdown signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cluster;
mod cluster_tls;
mod config;
mod deck;
mod standalone;
mod status;
mod tls;

/// Kong-compatible API gateway: Admin API, proxy, control and data planes.
#[derive(Parser, Debug)]
#[command(name = "gatehouse", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML, kong.conf key names); also GATEHOUSE_CONF.
    #[arg(long, global = true, value_name = "FILE")]
    conf: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Admin API and the proxy in one process on an embedded
    /// SQLite database (or PostgreSQL with database_url=postgres://…).
    ///
    /// Settings come from defaults, then the --conf file, then GATEHOUSE_*
    /// variables: GATEHOUSE_PREFIX (state directory, ./gatehouse),
    /// GATEHOUSE_ADMIN_LISTEN (127.0.0.1:8001), GATEHOUSE_PROXY_LISTEN
    /// (0.0.0.0:8000, 0.0.0.0:8443 ssl), GATEHOUSE_DATABASE_URL,
    /// GATEHOUSE_WORKER_THREADS, GATEHOUSE_LOG_LEVEL, GATEHOUSE_LOG_FORMAT
    /// (human|json), GATEHOUSE_PROXY_ACCESS_LOG (off|stdout), GATEHOUSE_SSL_CERT
    /// and GATEHOUSE_SSL_CERT_KEY (default certificate of ssl listeners),
    /// GATEHOUSE_NGINX_HTTP_CLIENT_MAX_BODY_SIZE (0), and the other keys of
    /// docs/configure.md.
    Standalone,
    /// Run a control plane: the Admin API on PostgreSQL (database_url) and
    /// the cluster listener (cluster_listen, 0.0.0.0:8005) that data planes
    /// sync from.
    Cp,
    /// Run a data plane: the proxy, configured by the control plane at
    /// cluster_control_plane (host:port), with no database.
    Dp,
    /// Cluster utilities.
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
    },
    /// Declarative configuration against an Admin API (validate, diff,
    /// sync, dump, reset), or `show` the effective settings (the default).
    Config {
        #[command(subcommand)]
        action: Option<deck::ConfigCommand>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Write a self-signed certificate and key for cluster_mtls = shared:
    /// give the same pair to the control plane and every data plane
    /// (cluster_cert, cluster_cert_key).
    GenCert {
        #[arg(long, value_name = "PATH")]
        cert: PathBuf,
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3 * 365)]
        days: u32,
    },
    /// bench/sync's light stream clients (see docs/benchmarks.md).
    #[command(hide = true)]
    BenchClients {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
}

/// Exit status for bad configuration (EX_USAGE), as sysexits.h.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config::Config::load(cli.conf.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatehouse: {}", error_chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Cluster {
        action: ClusterCommand::GenCert { cert, key, days },
    } = &cli.command
    {
        return match cluster_tls::gen_cert(cert, key, *days) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatehouse: {}", error_chain(e.as_ref()));
                ExitCode::FAILURE
            }
        };
    }
    match cli.command {
        Command::Cluster {
            action: ClusterCommand::BenchClients { count },
        } => match cluster::run_bench_clients(cfg, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatehouse: {}", error_chain(e.as_ref()));
                ExitCode::FAILURE
            }
        },
        Command::Cluster { .. } => ExitCode::SUCCESS,
        Command::Config {
            action: Some(action),
        } if !matches!(action, deck::ConfigCommand::Show) => match deck::run(action) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("Error: {}", error_chain(e.as_ref()));
                ExitCode::from(deck::EXIT_ERROR)
            }
        },
        Command::Config { .. } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&cfg.public_json()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Standalone | Command::Cp | Command::Dp => {
            let run = match cli.command {
                Command::Cp => cluster::run_cp(cfg),
                Command::Dp => cluster::run_dp(cfg),
                _ => standalone::run(cfg),
            };
            match run {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gatehouse: {}", error_chain(e.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// An error and its sources on one line, for operators.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
