//! `gatehouse config validate|diff|sync|dump|reset`: decK's workflow
//! against any Kong-compatible Admin API that has Gatehouse's `/config`.
//! The comparison is made by the server (`POST /config?dry_run=1`), with
//! the same validation and defaults as the load itself, so what `diff`
//! shows is exactly what `sync` changes, and a second `sync` of the same
//! file has nothing to do. `sync` applies the plan it showed with
//! `If-Match`, so a change made meanwhile by someone else is not
//! overwritten.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use gatehouse_model::declarative;
use serde_json::{json, Map, Value};

/// Exit statuses, for CI pipelines.
pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_ERROR: u8 = 1;
/// `diff --non-zero-exit-code` found changes (decK's convention).
pub(crate) const EXIT_CHANGES: u8 = 2;

#[derive(clap::Args, Debug)]
pub(crate) struct Target {
    /// The Admin API to work against (decK's `--kong-addr`).
    #[arg(
        long,
        env = "GATEHOUSE_ADMIN_URL",
        default_value = "http://localhost:8001"
    )]
    admin_url: String,
    /// Manage only entities with this tag (repeatable, decK's
    /// `--select-tag`): the file's entities get it, others are left alone.
    #[arg(long = "select-tag")]
    select_tags: Vec<String>,
    /// Do not verify the Admin API's certificate (an https URL with a
    /// self-signed certificate).
    #[arg(long)]
    tls_skip_verify: bool,
}

impl Target {
    /// `?select_tags=…` for `/config`, when tags are selected.
    fn query(&self) -> Vec<(&'static str, String)> {
        if self.select_tags.is_empty() {
            Vec::new()
        } else {
            vec![("select_tags", self.select_tags.join(","))]
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Print the effective settings (the default without a subcommand).
    Show,
    /// Check declarative files: offline (format, nesting, references), or
    /// with --online also every entity against the Admin API's schemas.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        online: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show what `sync` would change, and the routes whose traffic it
    /// affects.
    Diff {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Exit with 2 when there are changes.
        #[arg(long)]
        non_zero_exit_code: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make the gateway's configuration the one in the files, atomically.
    Sync {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Show the changes and stop.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Write the gateway's configuration as a decK 3.0 file.
    Dump {
        /// `-` for stdout.
        #[arg(short, long, default_value = "kong.yaml")]
        output_file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Delete every entity.
    Reset {
        /// Required: there is no undo.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// Runs a subcommand; the exit status.
pub(crate) fn run(command: ConfigCommand) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async move {
        match command {
            ConfigCommand::Show => Ok(EXIT_OK),
            ConfigCommand::Validate {
                files,
                online,
                target,
            } => validate(&files, online.then_some(&target)).await,
            ConfigCommand::Diff {
                files,
                non_zero_exit_code,
                target,
            } => {
                let plan = plan(&target, &read_files(&files)?).await?;
                print_plan(&plan.changes);
                Ok(if non_zero_exit_code && !plan.changes.is_empty() {
                    EXIT_CHANGES
                } else {
                    EXIT_OK
                })
            }
            ConfigCommand::Sync {
                files,
                dry_run,
                target,
            } => sync(&target, &read_files(&files)?, dry_run).await,
            ConfigCommand::Dump {
                output_file,
                target,
            } => dump(&target, &output_file).await,
            ConfigCommand::Reset { force, target } => {
                if !force {
                    bail!("reset deletes every entity: run it again with --force");
                }
                sync(&target, &json!({"_format_version": "3.0"}), false).await
            }
        }
    })
}

/// The files as one configuration: entity lists concatenated, as decK
/// merges several state files.
fn read_files(files: &[PathBuf]) -> anyhow::Result<Value> {
    let mut merged = Map::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let value = declarative::parse_text(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let Value::Object(top) = value else {
            bail!("{}: expected an object at the top", file.display());
        };
        for (key, value) in top {
            match (merged.get_mut(&key), value) {
                (Some(Value::Array(into)), Value::Array(more)) => into.extend(more),
                (_, value) => {
                    merged.insert(key, value);
                }
            }
        }
    }
    Ok(Value::Object(merged))
}

impl Target {
    /// A client for this Admin API, http or https.
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        // reqwest names no crypto provider; ring is Gatehouse's. Installed
        // once per process (a second install is refused, which is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = gatehouse_data_plane::https_client_config(!self.tls_skip_verify)
            .context("cannot build a TLS client config")?;
        reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .use_preconfigured_tls(tls)
            .build()
            .context("cannot build an HTTP client")
    }
}

async fn validate(files: &[PathBuf], online: Option<&Target>) -> anyhow::Result<u8> {
    let config = read_files(files)?;
    if let Err(error) = declarative::flatten(config.clone()) {
        match error {
            declarative::DeclarativeError::Parse(text) => eprintln!("Error: {text}"),
            declarative::DeclarativeError::Invalid(fields) => {
                eprintln!("Error: invalid declarative configuration: {fields}");
            }
        }
        return Ok(EXIT_ERROR);
    }
    if let Some(target) = online {
        plan(target, &config).await?;
    }
    println!("The configuration is valid.");
    Ok(EXIT_OK)
}

struct Plan {
    changes: Vec<Value>,
    hash: String,
}

/// `POST /config?dry_run=1`: what loading `config` would change.
async fn plan(target: &Target, config: &Value) -> anyhow::Result<Plan> {
    let url = format!(
        "{}/config?dry_run=1&flatten_errors=1",
        target.admin_url.trim_end_matches('/')
    );
    let response = target
        .client()?
        .post(&url)
        .query(&target.query())
        .json(config)
        .send()
        .await
        .with_context(|| format!("cannot reach the Admin API at {}", target.admin_url))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.as_u16() == 400 {
        report_errors(&body);
        bail!("the configuration does not validate");
    }
    if !status.is_success() {
        bail!("the Admin API answered {status}: {body}");
    }
    Ok(Plan {
        changes: body["changes"].as_array().cloned().unwrap_or_default(),
        hash: body["hash"].as_str().unwrap_or_default().to_owned(),
    })
}

fn report_errors(body: &Value) {
    match body["flattened_errors"].as_array() {
        Some(list) if !list.is_empty() => {
            for entry in list {
                let who = entry["entity_name"]
                    .as_str()
                    .or(entry["entity_id"].as_str())
                    .unwrap_or("?");
                for error in entry["errors"].as_array().into_iter().flatten() {
                    match error["field"].as_str() {
                        Some(field) => eprintln!(
                            "Error: {} {who}: {field}: {}",
                            entry["entity_type"].as_str().unwrap_or("entity"),
                            error["message"].as_str().unwrap_or("")
                        ),
                        None => eprintln!(
                            "Error: {} {who}: {}",
                            entry["entity_type"].as_str().unwrap_or("entity"),
                            error["message"].as_str().unwrap_or("")
                        ),
                    }
                }
            }
        }
        _ => eprintln!(
            "Error: {}",
            body["message"]
                .as_str()
                .unwrap_or("invalid declarative configuration")
        ),
    }
}

fn singular(entity: &str) -> &str {
    entity.strip_suffix('s').unwrap_or(entity)
}

/// decK's output: one line per change, field changes under updates, the
/// routes whose traffic changes, then a summary.
fn print_plan(changes: &[Value]) {
    let (mut created, mut updated, mut deleted) = (0, 0, 0);
    for change in changes {
        let action = change["action"].as_str().unwrap_or("");
        let entity = singular(change["entity"].as_str().unwrap_or(""));
        let name = change["name"]
            .as_str()
            .or(change["id"].as_str())
            .unwrap_or("");
        let verb = match action {
            "create" => {
                created += 1;
                "creating"
            }
            "update" => {
                updated += 1;
                "updating"
            }
            _ => {
                deleted += 1;
                "deleting"
            }
        };
        println!("{verb} {entity} {name}");
        if let Some(fields) = change["fields"].as_object() {
            for (field, diff) in fields {
                println!("  {field}: {} -> {}", diff["old"], diff["new"]);
            }
        }
        if let Some(routes) = change["routes"].as_array().filter(|r| !r.is_empty()) {
            let names: Vec<&str> = routes.iter().filter_map(Value::as_str).collect();
            let names = if names.contains(&"*") {
                "all routes".to_owned()
            } else {
                names.join(", ")
            };
            println!("  traffic affected: {names}");
        }
    }
    println!("Summary:");
    println!("  Created: {created}");
    println!("  Updated: {updated}");
    println!("  Deleted: {deleted}");
}

async fn sync(target: &Target, config: &Value, dry_run: bool) -> anyhow::Result<u8> {
    let plan = plan(target, config).await?;
    print_plan(&plan.changes);
    if dry_run || plan.changes.is_empty() {
        return Ok(EXIT_OK);
    }
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_message(format!("applying {} changes", plan.changes.len()));
    progress.enable_steady_tick(Duration::from_millis(120));
    let url = format!("{}/config", target.admin_url.trim_end_matches('/'));
    let response = target
        .client()?
        .post(&url)
        .query(&target.query())
        .header("if-match", format!("\"{}\"", plan.hash))
        .json(config)
        .send()
        .await
        .with_context(|| format!("cannot reach the Admin API at {}", target.admin_url))?;
    progress.finish_and_clear();
    let status = response.status().as_u16();
    match status {
        201 => Ok(EXIT_OK),
        412 => bail!(
            "the configuration changed while this sync ran; nothing was applied, run it again"
        ),
        400 => {
            report_errors(&response.json().await.unwrap_or(Value::Null));
            Ok(EXIT_ERROR)
        }
        _ => bail!(
            "the Admin API answered {status}: {}",
            response.text().await.unwrap_or_default()
        ),
    }
}

/// Fields the gateway sets that a file does not carry: leaving them out
/// makes `dump` after `reset` and `sync` give the same file.
const GENERATED: [&str; 2] = ["created_at", "updated_at"];

async fn dump(target: &Target, output: &Path) -> anyhow::Result<u8> {
    let url = format!("{}/config", target.admin_url.trim_end_matches('/'));
    let body: Value = target
        .client()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach the Admin API at {}", target.admin_url))?
        .error_for_status()?
        .json()
        .await
        .context("the Admin API's /config is not JSON")?;
    let text = body["config"].as_str().context("no config in /config")?;
    let mut file = declarative::parse_text(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Value::Object(top) = &mut file {
        let selected = |entity: &Value| {
            target.select_tags.iter().all(|tag| {
                entity["tags"]
                    .as_array()
                    .is_some_and(|tags| tags.iter().any(|t| t.as_str() == Some(tag)))
            })
        };
        for list in top.values_mut() {
            if let Value::Array(items) = list {
                items.retain(selected);
            }
            for entity in list.as_array_mut().into_iter().flatten() {
                if let Value::Object(fields) = entity {
                    for field in GENERATED {
                        fields.remove(field);
                    }
                    fields.sort_keys();
                }
            }
        }
    }
    if let Value::Object(top) = &mut file {
        top.retain(|key, value| {
            key.starts_with('_') || value.as_array().is_some_and(|l| !l.is_empty())
        });
        if !target.select_tags.is_empty() {
            // decK's marker: syncing this file manages these tags only.
            top.insert("_info".into(), json!({ "select_tags": target.select_tags }));
        }
    }
    let yaml = declarative::to_yaml(&file);
    if output == Path::new("-") {
        print!("{yaml}");
    } else {
        std::fs::write(output, yaml)
            .with_context(|| format!("cannot write {}", output.display()))?;
    }
    Ok(EXIT_OK)
}
