//! Durable storage: entities as JSON documents, an ordered change log and a
//! global config version, behind one trait with a SQLite and a PostgreSQL
//! backend. Every write is one transaction that stores the entity changes,
//! appends them to the change log and bumps the version, so a reader never
//! sees entities without their log rows or the reverse.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("stored entity {entity}/{id} is not valid JSON")]
    Corrupt {
        entity: String,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported database url {0:?} (expected sqlite://… or postgres://…)")]
    UnsupportedUrl(String),
}

/// One entity change inside a write.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert {
        entity: &'static str,
        id: String,
        body: Value,
    },
    Delete {
        entity: &'static str,
        id: String,
    },
}

/// A stored entity row.
#[derive(Debug, Clone)]
pub struct StoredEntity {
    pub entity: String,
    pub id: String,
    /// The entity's JSON text, parsed by the caller one row at a time.
    pub body: String,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A database backend. Implementations run `commit` as one transaction.
pub trait Backend: Send + Sync {
    /// Every stored entity and the current config version.
    fn load(&self) -> BoxFut<'_, (Vec<StoredEntity>, u64)>;
    /// Store `changes` atomically and return the new config version.
    fn commit<'a>(&'a self, changes: &'a [Change]) -> BoxFut<'a, u64>;
    /// Whether the database answers.
    fn ping(&self) -> BoxFut<'_, ()>;
    /// Upserts data-plane records `(id, JSON body, last_seen)` in one
    /// transaction.
    fn save_data_planes<'a>(&'a self, planes: &'a [(String, String, i64)]) -> BoxFut<'a, ()>;
    /// Data-plane records seen since `since` (unix seconds).
    fn load_data_planes(&self, since: i64) -> BoxFut<'_, Vec<(String, String)>>;
    fn kind(&self) -> &'static str;
}

/// Open the database named by `url` and apply migrations.
pub async fn open(url: &str) -> Result<Box<dyn Backend>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Box::new(Sqlite::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(Postgres::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The statements the store runs, in each database's dialect.
struct Sql {
    /// Run first in the read transaction of `load`, if any.
    read_isolation: Option<&'static str>,
    select_entities: &'static str,
    upsert_entity: &'static str,
    log_upsert: &'static str,
    delete_entity: &'static str,
    log_delete: &'static str,
    upsert_plane: &'static str,
    select_planes: &'static str,
}

const SQLITE_SQL: Sql = Sql {
    read_isolation: None,
    select_entities: "SELECT entity, id, body FROM entities ORDER BY entity, id",
    upsert_entity: "INSERT INTO entities (entity, id, body) VALUES (?1, ?2, ?3) \
                    ON CONFLICT (entity, id) DO UPDATE SET body = excluded.body",
    log_upsert: "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 VALUES (?1, ?2, ?3, ?4, 'upsert', ?5, ?6)",
    delete_entity: "DELETE FROM entities WHERE entity = ?1 AND id = ?2",
    log_delete: "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 VALUES (?1, ?2, ?3, ?4, 'delete', NULL, ?5)",
    upsert_plane: "INSERT INTO data_planes (id, body, last_seen) VALUES (?1, ?2, ?3) \
                   ON CONFLICT (id) DO UPDATE SET body = excluded.body, last_seen = excluded.last_seen",
    select_planes: "SELECT id, body FROM data_planes WHERE last_seen >= ?1 ORDER BY id",
};

const POSTGRES_SQL: Sql = Sql {
    read_isolation: Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    select_entities: "SELECT entity, id::text, body::text FROM entities ORDER BY entity, id",
    upsert_entity: "INSERT INTO entities (entity, id, body) VALUES ($1, $2::uuid, $3::jsonb) \
                    ON CONFLICT (entity, id) DO UPDATE SET body = excluded.body",
    log_upsert: "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 VALUES ($1, $2, $3, $4::uuid, 'upsert', $5::jsonb, $6)",
    delete_entity: "DELETE FROM entities WHERE entity = $1 AND id = $2::uuid",
    log_delete: "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 VALUES ($1, $2, $3, $4::uuid, 'delete', NULL, $5)",
    upsert_plane: "INSERT INTO data_planes (id, body, last_seen) VALUES ($1, $2::jsonb, $3) \
                   ON CONFLICT (id) DO UPDATE SET body = excluded.body, last_seen = excluded.last_seen",
    select_planes: "SELECT id, body::text FROM data_planes WHERE last_seen >= $1 ORDER BY id",
};

/// One write as one transaction: bump the version (the row lock on
/// `config_version` serialises writers from every control-plane node, so
/// versions are gap-free and ordered), store or delete each entity, and log
/// each change under that version. A macro because sqlx's executor bounds
/// do not abstract over the two databases without a page of generics.
macro_rules! commit_changes {
    ($pool:expr, $changes:expr, $sql:expr) => {
        Box::pin(async move {
            let sql = &$sql;
            let mut tx = $pool.begin().await?;
            let version: i64 = sqlx::query_scalar(
                "UPDATE config_version SET version = version + 1 RETURNING version",
            )
            .fetch_one(&mut *tx)
            .await?;
            let now = now_s();
            for (seq, change) in $changes.iter().enumerate() {
                let seq = i32::try_from(seq).unwrap_or(i32::MAX);
                match change {
                    Change::Upsert { entity, id, body } => {
                        let text = body.to_string();
                        sqlx::query(sql.upsert_entity)
                            .bind(*entity)
                            .bind(id)
                            .bind(&text)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(sql.log_upsert)
                            .bind(version)
                            .bind(seq)
                            .bind(*entity)
                            .bind(id)
                            .bind(&text)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Change::Delete { entity, id } => {
                        sqlx::query(sql.delete_entity)
                            .bind(*entity)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(sql.log_delete)
                            .bind(version)
                            .bind(seq)
                            .bind(*entity)
                            .bind(id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            tx.commit().await?;
            Ok(version as u64)
        })
    };
}

/// Every entity and the version they are at, read in one transaction.
macro_rules! load_all {
    ($pool:expr, $sql:expr) => {
        Box::pin(async move {
            let sql = &$sql;
            let mut tx = $pool.begin().await?;
            if let Some(isolation) = sql.read_isolation {
                sqlx::query(isolation).execute(&mut *tx).await?;
            }
            let version: i64 = sqlx::query_scalar("SELECT version FROM config_version")
                .fetch_one(&mut *tx)
                .await?;
            let rows = sqlx::query(sql.select_entities).fetch_all(&mut *tx).await?;
            tx.commit().await?;
            let rows = rows
                .into_iter()
                .map(|r| StoredEntity {
                    entity: r.get(0),
                    id: r.get(1),
                    body: r.get(2),
                })
                .collect();
            Ok((rows, version as u64))
        })
    };
}

/// Data-plane records in one transaction.
macro_rules! save_planes {
    ($pool:expr, $planes:expr, $sql:expr) => {
        Box::pin(async move {
            let mut tx = $pool.begin().await?;
            for (id, body, last_seen) in $planes {
                sqlx::query($sql.upsert_plane)
                    .bind(id)
                    .bind(body)
                    .bind(*last_seen)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    };
}

macro_rules! load_planes {
    ($pool:expr, $since:expr, $sql:expr) => {
        Box::pin(async move {
            let rows = sqlx::query($sql.select_planes)
                .bind($since)
                .fetch_all(&$pool)
                .await?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    };
}

pub struct Sqlite {
    pool: SqlitePool,
}

impl Sqlite {
    pub async fn open(url: &str) -> Result<Sqlite, StoreError> {
        let connect = |source| StoreError::Connect {
            url: url.to_owned(),
            source,
        };
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(connect)?
            .create_if_missing(true)
            // WAL with NORMAL sync keeps commits durable against process
            // crashes while making each Admin write cost one fsync at most.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(connect)?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        Ok(Sqlite { pool })
    }
}

impl Backend for Sqlite {
    fn load(&self) -> BoxFut<'_, (Vec<StoredEntity>, u64)> {
        load_all!(self.pool, SQLITE_SQL)
    }

    fn commit<'a>(&'a self, changes: &'a [Change]) -> BoxFut<'a, u64> {
        commit_changes!(self.pool, changes, SQLITE_SQL)
    }

    fn save_data_planes<'a>(&'a self, planes: &'a [(String, String, i64)]) -> BoxFut<'a, ()> {
        save_planes!(self.pool, planes, SQLITE_SQL)
    }

    fn load_data_planes(&self, since: i64) -> BoxFut<'_, Vec<(String, String)>> {
        load_planes!(self.pool, since, SQLITE_SQL)
    }

    fn ping(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

pub struct Postgres {
    pool: PgPool,
}

impl Postgres {
    pub async fn open(url: &str) -> Result<Postgres, StoreError> {
        let connect = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let opts = PgConnectOptions::from_str(url).map_err(connect)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(connect)?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        Ok(Postgres { pool })
    }
}

/// A database URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:****{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// From this many changes (a declarative load), PostgreSQL gets arrays of
/// rows per statement rather than two round trips per change: 50,000
/// entities are seconds, not minutes.
const BATCH_FROM: usize = 64;
/// Rows per batched statement.
const BATCH_ROWS: usize = 5_000;

impl Postgres {
    /// `commit_changes!` with the same effects, in batches: upserts and
    /// deletes keep their order within the transaction (a delete of an
    /// entity and the insert of another with its unique name can both be
    /// in one load), as do their `change_log` sequence numbers.
    async fn commit_batched(&self, changes: &[Change]) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let version: i64 =
            sqlx::query_scalar("UPDATE config_version SET version = version + 1 RETURNING version")
                .fetch_one(&mut *tx)
                .await?;
        let now = now_s();
        let indexed: Vec<(i32, &Change)> = changes
            .iter()
            .enumerate()
            .map(|(seq, change)| (i32::try_from(seq).unwrap_or(i32::MAX), change))
            .collect();
        // Deletes first: a load never deletes and re-creates one id, and
        // freeing unique values before inserting is the order that cannot
        // conflict.
        let deletes: Vec<(i32, &str, &str)> = indexed
            .iter()
            .filter_map(|(seq, change)| match change {
                Change::Delete { entity, id } => Some((*seq, *entity, id.as_str())),
                Change::Upsert { .. } => None,
            })
            .collect();
        for chunk in deletes.chunks(BATCH_ROWS) {
            let seqs: Vec<i32> = chunk.iter().map(|(seq, _, _)| *seq).collect();
            let entities: Vec<&str> = chunk.iter().map(|(_, entity, _)| *entity).collect();
            let ids: Vec<&str> = chunk.iter().map(|(_, _, id)| *id).collect();
            sqlx::query(
                "DELETE FROM entities e USING UNNEST($1::text[], $2::text[]) AS d(entity, id) \
                 WHERE e.entity = d.entity AND e.id = d.id::uuid",
            )
            .bind(&entities)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 SELECT $1, d.seq, d.entity, d.id::uuid, 'delete', NULL, $5 \
                 FROM UNNEST($2::int4[], $3::text[], $4::text[]) AS d(seq, entity, id)",
            )
            .bind(version)
            .bind(&seqs)
            .bind(&entities)
            .bind(&ids)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let upserts: Vec<(i32, &str, &str, String)> = indexed
            .iter()
            .filter_map(|(seq, change)| match change {
                Change::Upsert { entity, id, body } => {
                    Some((*seq, *entity, id.as_str(), body.to_string()))
                }
                Change::Delete { .. } => None,
            })
            .collect();
        for chunk in upserts.chunks(BATCH_ROWS) {
            let seqs: Vec<i32> = chunk.iter().map(|(seq, ..)| *seq).collect();
            let entities: Vec<&str> = chunk.iter().map(|(_, entity, ..)| *entity).collect();
            let ids: Vec<&str> = chunk.iter().map(|(_, _, id, _)| *id).collect();
            let bodies: Vec<&str> = chunk.iter().map(|(.., body)| body.as_str()).collect();
            sqlx::query(
                "INSERT INTO entities (entity, id, body) \
                 SELECT d.entity, d.id::uuid, d.body::jsonb \
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS d(entity, id, body) \
                 ON CONFLICT (entity, id) DO UPDATE SET body = excluded.body",
            )
            .bind(&entities)
            .bind(&ids)
            .bind(&bodies)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO change_log (version, seq, entity, id, op, body, created_at) \
                 SELECT $1, d.seq, d.entity, d.id::uuid, 'upsert', d.body::jsonb, $6 \
                 FROM UNNEST($2::int4[], $3::text[], $4::text[], $5::text[]) \
                 AS d(seq, entity, id, body)",
            )
            .bind(version)
            .bind(&seqs)
            .bind(&entities)
            .bind(&ids)
            .bind(&bodies)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(version as u64)
    }
}

impl Backend for Postgres {
    fn load(&self) -> BoxFut<'_, (Vec<StoredEntity>, u64)> {
        load_all!(self.pool, POSTGRES_SQL)
    }

    fn commit<'a>(&'a self, changes: &'a [Change]) -> BoxFut<'a, u64> {
        if changes.len() < BATCH_FROM {
            return commit_changes!(self.pool, changes, POSTGRES_SQL);
        }
        Box::pin(self.commit_batched(changes))
    }

    fn save_data_planes<'a>(&'a self, planes: &'a [(String, String, i64)]) -> BoxFut<'a, ()> {
        save_planes!(self.pool, planes, POSTGRES_SQL)
    }

    fn load_data_planes(&self, since: i64) -> BoxFut<'_, Vec<(String, String)>> {
        load_planes!(self.pool, since, POSTGRES_SQL)
    }

    fn ping(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
