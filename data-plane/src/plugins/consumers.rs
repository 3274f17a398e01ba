//! Consumers and their credentials, indexed by what a request presents
//! (an API key, a username, a JWT `iss`), so that authentication is one
//! hash lookup. Kong caches these per node after a database read; here
//! they come with the configuration.

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_model::snapshot::ConfigSnapshot;
use http::HeaderValue;
use serde::Deserialize;

#[derive(Debug)]
pub(crate) struct Consumer {
    pub(crate) id: Box<str>,
    pub(crate) username: Option<Box<str>>,
    pub(crate) custom_id: Option<Box<str>>,
    pub(crate) id_value: HeaderValue,
    pub(crate) username_value: Option<HeaderValue>,
    pub(crate) custom_id_value: Option<HeaderValue>,
    /// acl groups, sorted, without duplicates.
    pub(crate) groups: Vec<Box<str>>,
    /// `X-Consumer-Groups` for these groups, when there are any.
    pub(crate) groups_value: Option<HeaderValue>,
}

/// A credential with its owner.
pub(crate) struct Owned<T> {
    pub(crate) id: HeaderValue,
    pub(crate) consumer: Arc<Consumer>,
    pub(crate) secret: T,
}

pub(crate) struct JwtSecret {
    pub(crate) algorithm: Box<str>,
    pub(crate) secret: Option<Box<str>>,
    pub(crate) rsa_public_key: Option<Box<str>>,
}

#[derive(Default)]
pub(crate) struct Consumers {
    by_id: HashMap<Box<str>, Arc<Consumer>>,
    by_username: HashMap<Box<str>, Arc<Consumer>>,
    /// By the key a request presents; a seeded fast hash, as keys come
    /// from clients.
    /// The secret is when the key expires (Kong's `ttl`, unix seconds).
    pub(crate) keys: HashMap<Box<str>, Owned<Option<u64>>, foldhash::fast::RandomState>,
    /// basic-auth: the stored hash (SHA-1 of password and consumer id).
    pub(crate) basic: HashMap<Box<str>, Owned<Box<str>>>,
    pub(crate) jwt: HashMap<Box<str>, Owned<JwtSecret>>,
    /// hmac-auth: the secret.
    pub(crate) hmac: HashMap<Box<str>, Owned<Box<str>>>,
}

#[derive(Deserialize)]
struct ConsumerDoc {
    id: String,
    username: Option<String>,
    custom_id: Option<String>,
}

#[derive(Deserialize)]
struct Ref {
    id: String,
}

#[derive(Deserialize)]
struct CredentialDoc {
    id: String,
    consumer: Ref,
    key: Option<String>,
    username: Option<String>,
    password: Option<String>,
    secret: Option<String>,
    group: Option<String>,
    algorithm: Option<String>,
    rsa_public_key: Option<String>,
    /// When the credential expires (unix seconds); stored by the control
    /// plane, which purges it then, but a data plane may not hear of the
    /// purge in time.
    ttl: Option<u64>,
}

fn value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("{text:?} cannot be sent in a header"))
}

impl Consumers {
    pub(crate) fn build(snapshot: &ConfigSnapshot) -> Result<Consumers, String> {
        let docs: Vec<ConsumerDoc> = snapshot.typed("consumers").map_err(|e| e.to_string())?;
        let mut groups: HashMap<String, Vec<Box<str>>> = HashMap::new();
        let acls: Vec<CredentialDoc> = snapshot.typed("acls").map_err(|e| e.to_string())?;
        for acl in acls {
            if let Some(group) = acl.group {
                groups
                    .entry(acl.consumer.id)
                    .or_default()
                    .push(group.into());
            }
        }
        let mut out = Consumers::default();
        for doc in docs {
            let mut consumer_groups = groups.remove(&doc.id).unwrap_or_default();
            consumer_groups.sort();
            consumer_groups.dedup();
            let groups_value = if consumer_groups.is_empty() {
                None
            } else {
                Some(value(&consumer_groups.join(", "))?)
            };
            let consumer = Arc::new(Consumer {
                id_value: value(&doc.id)?,
                username_value: doc.username.as_deref().map(value).transpose()?,
                custom_id_value: doc.custom_id.as_deref().map(value).transpose()?,
                id: doc.id.into(),
                username: doc.username.map(Into::into),
                custom_id: doc.custom_id.map(Into::into),
                groups: consumer_groups,
                groups_value,
            });
            if let Some(username) = &consumer.username {
                out.by_username
                    .insert(username.clone(), Arc::clone(&consumer));
            }
            out.by_id.insert(consumer.id.clone(), consumer);
        }
        let owner =
            |out: &Consumers, doc: &CredentialDoc| -> Option<(HeaderValue, Arc<Consumer>)> {
                let consumer = out.by_id.get(doc.consumer.id.as_str())?;
                Some((value(&doc.id).ok()?, Arc::clone(consumer)))
            };
        for doc in snapshot
            .typed::<CredentialDoc>("keyauth_credentials")
            .map_err(|e| e.to_string())?
        {
            if let (Some((id, consumer)), Some(key)) = (owner(&out, &doc), doc.key.as_deref()) {
                out.keys.insert(
                    key.into(),
                    Owned {
                        id,
                        consumer,
                        secret: doc.ttl,
                    },
                );
            }
        }
        for doc in snapshot
            .typed::<CredentialDoc>("basicauth_credentials")
            .map_err(|e| e.to_string())?
        {
            if let (Some((id, consumer)), Some(username), Some(password)) = (
                owner(&out, &doc),
                doc.username.as_deref(),
                doc.password.as_deref(),
            ) {
                out.basic.insert(
                    username.into(),
                    Owned {
                        id,
                        consumer,
                        secret: password.into(),
                    },
                );
            }
        }
        for doc in snapshot
            .typed::<CredentialDoc>("jwt_secrets")
            .map_err(|e| e.to_string())?
        {
            if let (Some((id, consumer)), Some(key)) = (owner(&out, &doc), doc.key.as_deref()) {
                let secret = JwtSecret {
                    algorithm: doc.algorithm.as_deref().unwrap_or("HS256").into(),
                    secret: doc.secret.as_deref().map(Into::into),
                    rsa_public_key: doc.rsa_public_key.as_deref().map(Into::into),
                };
                out.jwt.insert(
                    key.into(),
                    Owned {
                        id,
                        consumer,
                        secret,
                    },
                );
            }
        }
        for doc in snapshot
            .typed::<CredentialDoc>("hmacauth_credentials")
            .map_err(|e| e.to_string())?
        {
            if let (Some((id, consumer)), Some(username), Some(secret)) = (
                owner(&out, &doc),
                doc.username.as_deref(),
                doc.secret.as_deref(),
            ) {
                out.hmac.insert(
                    username.into(),
                    Owned {
                        id,
                        consumer,
                        secret: secret.into(),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Kong's `kong.client.load_consumer(id_or_name, true)`: by id, else
    /// by username (how `anonymous` is resolved).
    pub(crate) fn by_id_or_username(&self, key: &str) -> Option<&Arc<Consumer>> {
        self.by_id.get(key).or_else(|| self.by_username.get(key))
    }
}
