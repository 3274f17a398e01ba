//! Authentication plugins (basic-auth, acl, jwt, hmac-auth) through a real
//! proxy and a real echo upstream. The expectations come from Kong 3.9's
//! `kong/plugins/<name>/{access,handler}.lua`, not from our implementation.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::plugins::{Answer, Setup};

fn basic(user_pass: &str) -> String {
    format!("Basic {}", B64.encode(user_pass))
}

/// Asserts that `a` was authenticated as `username` with the credential
/// identified by `credential` (basic-auth and hmac-auth: the credential's
/// username; jwt: its key), as `set_consumer` in Kong's access.lua does.
fn assert_consumer(a: &Answer, consumer: &Value, credential: &str) {
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.upstream_header("x-consumer-username").as_deref(),
        consumer["username"].as_str()
    );
    assert_eq!(
        a.upstream_header("x-consumer-id").as_deref(),
        consumer["id"].as_str()
    );
    assert_eq!(
        a.upstream_header("x-consumer-custom-id").as_deref(),
        consumer["custom_id"].as_str()
    );
    assert_eq!(
        a.upstream_header("x-credential-identifier").as_deref(),
        Some(credential)
    );
    assert_eq!(a.upstream_header("x-anonymous-consumer"), None);
}

/// Asserts that `a` went upstream as the anonymous consumer `guest`.
fn assert_anonymous(a: &Answer, guest: &Value) {
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.upstream_header("x-consumer-username").as_deref(),
        Some("guest")
    );
    assert_eq!(
        a.upstream_header("x-consumer-id").as_deref(),
        guest["id"].as_str()
    );
    assert_eq!(a.upstream_header("x-credential-identifier"), None);
    assert_eq!(
        a.upstream_header("x-anonymous-consumer").as_deref(),
        Some("true")
    );
}

/// A 401 made with `kong.response.exit` (jwt): the body as given.
fn assert_401(a: &Answer, body: Value, www_authenticate: &str) {
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.json(), body);
    assert_eq!(a.header("www-authenticate"), Some(www_authenticate));
}

/// A 401 made with `kong.response.error`: Kong's error template.
fn assert_401_error(a: &Answer, body: Value, www_authenticate: &str) {
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.kong_error(), body);
    assert_eq!(a.header("www-authenticate"), Some(www_authenticate));
}

#[tokio::test]
async fn basic_auth_and_acl_answer_as_kong_does() {
    let mut s = Setup::start();
    for name in [
        "ba",
        "ba-hide",
        "ba-anon",
        "acl-allow",
        "acl-deny",
        "acl-only",
        "acl-anon",
    ] {
        s.service_route(name, &[&format!("/{name}")]).await;
    }
    let alice = s
        .post(
            "/consumers",
            json!({"username": "alice", "custom_id": "a-1"}),
        )
        .await;
    let bob = s.post("/consumers", json!({"username": "bob"})).await;
    let carol = s.post("/consumers", json!({"username": "carol"})).await;
    let guest = s.post("/consumers", json!({"username": "guest"})).await;
    // A password may hold colons: Kong splits on the first one only.
    s.post(
        "/consumers/alice/basic-auth",
        json!({"username": "alice", "password": "pa:ss"}),
    )
    .await;
    s.post(
        "/consumers/bob/basic-auth",
        json!({"username": "bob", "password": "bob-pw"}),
    )
    .await;
    s.post(
        "/consumers/carol/basic-auth",
        json!({"username": "carol", "password": "carol-pw"}),
    )
    .await;
    s.post("/consumers/alice/acls", json!({"group": "gold"}))
        .await;
    s.post("/consumers/alice/acls", json!({"group": "team"}))
        .await;
    s.post("/consumers/bob/acls", json!({"group": "silver"}))
        .await;
    // carol and guest are in no group.

    s.post("/routes/ba/plugins", json!({"name": "basic-auth"}))
        .await;
    s.post(
        "/routes/ba-hide/plugins",
        json!({"name": "basic-auth", "config": {"hide_credentials": true, "realm": "gatehouse"}}),
    )
    .await;
    s.post(
        "/routes/ba-anon/plugins",
        json!({"name": "basic-auth", "config": {"anonymous": "guest"}}),
    )
    .await;
    s.post("/routes/acl-allow/plugins", json!({"name": "basic-auth"}))
        .await;
    s.post(
        "/routes/acl-allow/plugins",
        json!({"name": "acl", "config": {"allow": ["gold"]}}),
    )
    .await;
    s.post("/routes/acl-deny/plugins", json!({"name": "basic-auth"}))
        .await;
    s.post(
        "/routes/acl-deny/plugins",
        json!({"name": "acl", "config": {"deny": ["silver"], "hide_groups_header": true}}),
    )
    .await;
    s.post(
        "/routes/acl-only/plugins",
        json!({"name": "acl", "config": {"allow": ["gold"]}}),
    )
    .await;
    s.post(
        "/routes/acl-anon/plugins",
        json!({"name": "basic-auth", "config": {"anonymous": guest["id"]}}),
    )
    .await;
    s.post(
        "/routes/acl-anon/plugins",
        json!({"name": "acl", "config": {"allow": ["gold"]}}),
    )
    .await;
    s.synced().await;

    let alice_auth = basic("alice:pa:ss");
    let bob_auth = basic("bob:bob-pw");
    let carol_auth = basic("carol:carol-pw");
    let realm = r#"Basic realm="service""#;
    let unauthorized = json!({"message": "Unauthorized"});

    // basic-auth: basic-auth/access.lua do_authentication.
    assert_401_error(&s.get("/ba", &[]).await, unauthorized.clone(), realm);
    for wrong in [
        basic("alice:nope"),
        basic("nobody:pa:ss"),
        basic("alice"),
        "Bearer abc".to_owned(),
    ] {
        let a = s.get("/ba", &[("authorization", &wrong)]).await;
        assert_401_error(&a, unauthorized.clone(), realm);
    }
    let ok = s.get("/ba", &[("authorization", &alice_auth)]).await;
    assert_consumer(&ok, &alice, "alice");
    assert_eq!(
        ok.upstream_header("authorization").as_deref(),
        Some(&*alice_auth),
        "kept without hide_credentials"
    );
    // "[Bb]asic" and any spacing before the base64.
    let lower = format!("basic   {}", B64.encode("alice:pa:ss"));
    assert_consumer(
        &s.get("/ba", &[("authorization", &lower)]).await,
        &alice,
        "alice",
    );
    // Proxy-Authorization is read first...
    assert_consumer(
        &s.get("/ba", &[("proxy-authorization", &bob_auth)]).await,
        &bob,
        "bob",
    );
    // ...and Authorization is the fallback when it names no credential.
    let fallback = s
        .get(
            "/ba",
            &[
                ("proxy-authorization", &basic("nobody:x")),
                ("authorization", &alice_auth),
            ],
        )
        .await;
    assert_consumer(&fallback, &alice, "alice");
    // But a credential found there is final: a wrong password is not
    // retried with Authorization.
    let no_retry = s
        .get(
            "/ba",
            &[
                ("proxy-authorization", &basic("bob:wrong")),
                ("authorization", &alice_auth),
            ],
        )
        .await;
    assert_401_error(&no_retry, unauthorized.clone(), realm);
    // The client's consumer headers are overwritten.
    let spoof = s
        .get(
            "/ba",
            &[
                ("authorization", &bob_auth),
                ("x-consumer-username", "alice"),
                ("x-consumer-custom-id", "a-1"),
            ],
        )
        .await;
    assert_consumer(&spoof, &bob, "bob");

    // hide_credentials and realm.
    assert_401_error(
        &s.get("/ba-hide", &[]).await,
        unauthorized.clone(),
        r#"Basic realm="gatehouse""#,
    );
    let hidden = s.get("/ba-hide", &[("authorization", &alice_auth)]).await;
    assert_consumer(&hidden, &alice, "alice");
    assert_eq!(hidden.upstream_header("authorization"), None);

    // anonymous: missing or wrong credentials become the anonymous consumer.
    assert_anonymous(&s.get("/ba-anon", &[]).await, &guest);
    assert_anonymous(
        &s.get("/ba-anon", &[("authorization", &basic("alice:nope"))])
            .await,
        &guest,
    );
    let known = s
        .get(
            "/ba-anon",
            &[
                ("authorization", &alice_auth),
                ("x-anonymous-consumer", "true"),
            ],
        )
        .await;
    assert_consumer(&known, &alice, "alice");

    // acl: acl/handler.lua.
    let forbidden = json!({"message": "You cannot consume this service"});
    let allowed = s.get("/acl-allow", &[("authorization", &alice_auth)]).await;
    assert_consumer(&allowed, &alice, "alice");
    // The client's X-Consumer-Groups is overwritten.
    let spoofed = s
        .get(
            "/acl-allow",
            &[
                ("authorization", &alice_auth),
                ("x-consumer-groups", "admin"),
            ],
        )
        .await;
    for a in [&allowed, &spoofed] {
        let groups = a.upstream_header("x-consumer-groups");
        assert!(
            matches!(groups.as_deref(), Some("gold, team" | "team, gold")),
            "{groups:?}"
        );
    }
    let denied = s.get("/acl-allow", &[("authorization", &bob_auth)]).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.kong_error(), forbidden);
    // An authenticated consumer in no group at all: 403 too.
    let groupless = s.get("/acl-allow", &[("authorization", &carol_auth)]).await;
    assert_eq!(groupless.status, 403, "{}", groupless.body);
    assert_eq!(groupless.kong_error(), forbidden);
    // Authentication runs first (priority 1100 > 950).
    assert_401_error(&s.get("/acl-allow", &[]).await, unauthorized.clone(), realm);

    // deny list with hide_groups_header.
    let passed = s.get("/acl-deny", &[("authorization", &alice_auth)]).await;
    assert_consumer(&passed, &alice, "alice");
    assert_eq!(passed.upstream_header("x-consumer-groups"), None);
    let blocked = s.get("/acl-deny", &[("authorization", &bob_auth)]).await;
    assert_eq!(blocked.status, 403);
    assert_eq!(blocked.kong_error(), forbidden);
    // No group is never in the deny list.
    let free = s.get("/acl-deny", &[("authorization", &carol_auth)]).await;
    assert_consumer(&free, &carol, "carol");
    assert_eq!(free.upstream_header("x-consumer-groups"), None);

    // No consumer at all: kong.response.error(401).
    let nobody = s.get("/acl-only", &[]).await;
    assert_eq!(nobody.status, 401);
    assert_eq!(nobody.kong_error(), unauthorized);
    // The anonymous consumer has no credential and no group: 401, not 403.
    let anon = s.get("/acl-anon", &[]).await;
    assert_eq!(anon.status, 401, "{}", anon.body);
    assert_eq!(anon.kong_error(), unauthorized);
    let member = s.get("/acl-anon", &[("authorization", &alice_auth)]).await;
    assert_consumer(&member, &alice, "alice");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn sign(alg: jsonwebtoken::Algorithm, claims: &Value, key: &jsonwebtoken::EncodingKey) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).expect("jwt")
}

fn hs(alg: jsonwebtoken::Algorithm, claims: Value, secret: &str) -> String {
    sign(
        alg,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[tokio::test]
async fn jwt_reads_tokens_and_verifies_hs256_es256_and_registered_claims() {
    use jsonwebtoken::{Algorithm, EncodingKey};

    let mut s = Setup::start();
    for name in [
        "jwt",
        "jwt-claims",
        "jwt-max",
        "jwt-realm",
        "jwt-anon",
        "jwt-b64",
    ] {
        s.service_route(name, &[&format!("/{name}")]).await;
    }
    let jay = s
        .post("/consumers", json!({"username": "jay", "custom_id": "j-1"}))
        .await;
    let eve = s.post("/consumers", json!({"username": "eve"})).await;
    let guest = s.post("/consumers", json!({"username": "guest"})).await;
    s.post(
        "/consumers/jay/jwt",
        json!({"key": "jay-iss", "secret": "jay-secret"}),
    )
    .await;
    let kim = s.post("/consumers", json!({"username": "kim"})).await;
    s.post(
        "/consumers/kim/jwt",
        json!({"key": "kim-iss", "secret": B64.encode("kim-raw-secret")}),
    )
    .await;
    let es_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let other_es_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    s.post(
        "/consumers/eve/jwt",
        json!({"key": "eve-iss", "algorithm": "ES256", "rsa_public_key": es_key.public_key_pem()}),
    )
    .await;

    s.post("/routes/jwt/plugins", json!({"name": "jwt"})).await;
    s.post(
        "/routes/jwt-claims/plugins",
        json!({"name": "jwt", "config": {"claims_to_verify": ["exp", "nbf"], "cookie_names": ["auth_token"]}}),
    )
    .await;
    s.post(
        "/routes/jwt-max/plugins",
        json!({"name": "jwt", "config": {"claims_to_verify": ["exp"], "maximum_expiration": 60}}),
    )
    .await;
    s.post(
        "/routes/jwt-realm/plugins",
        json!({"name": "jwt", "config": {"realm": "kong", "run_on_preflight": false}}),
    )
    .await;
    s.post(
        "/routes/jwt-anon/plugins",
        json!({"name": "jwt", "config": {"anonymous": guest["id"]}}),
    )
    .await;
    s.post(
        "/routes/jwt-b64/plugins",
        json!({"name": "jwt", "config": {"secret_is_base64": true}}),
    )
    .await;
    s.synced().await;

    let t = now();
    let jay_token = hs(
        Algorithm::HS256,
        json!({"iss": "jay-iss", "sub": "1"}),
        "jay-secret",
    );
    let bearer = |token: &str| format!("Bearer {token}");
    let invalid = r#"Bearer error="invalid_token""#;
    let unauthorized = json!({"message": "Unauthorized"});

    // Missing: jwt/handler.lua do_authentication, token_type "nil".
    assert_401(&s.get("/jwt", &[]).await, unauthorized.clone(), "Bearer");
    // In the Authorization header.
    let ok = s
        .get("/jwt", &[("authorization", &bearer(&jay_token))])
        .await;
    assert_consumer(&ok, &jay, "jay-iss");
    assert_eq!(
        ok.upstream_header("authorization"),
        Some(bearer(&jay_token)),
        "jwt never hides the token"
    );
    let lower = format!("bearer {jay_token}");
    assert_consumer(
        &s.get("/jwt", &[("authorization", &lower)]).await,
        &jay,
        "jay-iss",
    );
    // In the query (uri_param_names defaults to ["jwt"]); it stays there.
    let ok = s.get(&format!("/jwt?jwt={jay_token}&x=1"), &[]).await;
    assert_consumer(&ok, &jay, "jay-iss");
    assert_eq!(ok.json()["path"], format!("/?jwt={jay_token}&x=1"));
    // The same token twice is one token; two different tokens are refused.
    assert_consumer(
        &s.get(
            &format!("/jwt?jwt={jay_token}"),
            &[("authorization", &bearer(&jay_token))],
        )
        .await,
        &jay,
        "jay-iss",
    );
    let other = hs(
        Algorithm::HS256,
        json!({"iss": "jay-iss", "sub": "2"}),
        "jay-secret",
    );
    assert_401(
        &s.get(
            &format!("/jwt?jwt={other}"),
            &[("authorization", &bearer(&jay_token))],
        )
        .await,
        json!({"message": "Multiple tokens provided"}),
        invalid,
    );
    // Cookies are read only when configured.
    assert_401(
        &s.get("/jwt", &[("cookie", &format!("auth_token={jay_token}"))])
            .await,
        unauthorized.clone(),
        "Bearer",
    );
    // Claims are not verified unless asked for.
    let expired = hs(
        Algorithm::HS256,
        json!({"iss": "jay-iss", "exp": t - 3600}),
        "jay-secret",
    );
    assert_consumer(
        &s.get("/jwt", &[("authorization", &bearer(&expired))]).await,
        &jay,
        "jay-iss",
    );

    // Failures, in handler.lua's order.
    let cases = [
        ("not-a-jwt".to_owned(), "Bad token; invalid JSON"),
        (
            hs(Algorithm::HS256, json!({"sub": "1"}), "jay-secret"),
            "No mandatory 'iss' in claims",
        ),
        (
            hs(Algorithm::HS256, json!({"iss": ""}), "jay-secret"),
            "Invalid 'iss' in claims",
        ),
        (
            hs(Algorithm::HS256, json!({"iss": "unknown"}), "jay-secret"),
            "No credentials found for given 'iss'",
        ),
        (
            hs(Algorithm::HS512, json!({"iss": "jay-iss"}), "jay-secret"),
            "Invalid algorithm",
        ),
        (
            hs(Algorithm::HS256, json!({"iss": "eve-iss"}), "x"),
            "Invalid algorithm",
        ),
        (
            hs(
                Algorithm::HS256,
                json!({"iss": "jay-iss"}),
                "not-the-secret",
            ),
            "Invalid signature",
        ),
    ];
    for (token, message) in &cases {
        let a = s.get("/jwt", &[("authorization", &bearer(token))]).await;
        assert_401(&a, json!({"message": message}), invalid);
    }
    // A tampered payload under the original signature.
    let mut parts: Vec<&str> = jay_token.split('.').collect();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"iss": "jay-iss", "sub": "admin"}).to_string());
    parts[1] = &forged;
    assert_401(
        &s.get("/jwt", &[("authorization", &bearer(&parts.join(".")))])
            .await,
        json!({"message": "Invalid signature"}),
        invalid,
    );

    // ES256 with the consumer's public key (raw r||s signatures, RFC 7518).
    let es = |claims: Value, key: &rcgen::KeyPair| {
        sign(
            Algorithm::ES256,
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("ec key"),
        )
    };
    let eve_token = es(json!({"iss": "eve-iss"}), &es_key);
    assert_consumer(
        &s.get("/jwt", &[("authorization", &bearer(&eve_token))])
            .await,
        &eve,
        "eve-iss",
    );
    assert_401(
        &s.get(
            "/jwt",
            &[(
                "authorization",
                &bearer(&es(json!({"iss": "eve-iss"}), &other_es_key)),
            )],
        )
        .await,
        json!({"message": "Invalid signature"}),
        invalid,
    );

    // claims_to_verify: the body is the errors table, no "message".
    let claims = |c: Value| hs(Algorithm::HS256, c, "jay-secret");
    let valid = claims(json!({"iss": "jay-iss", "exp": t + 3600, "nbf": t - 60}));
    assert_consumer(
        &s.get("/jwt-claims", &[("authorization", &bearer(&valid))])
            .await,
        &jay,
        "jay-iss",
    );
    // From the configured cookie, among others.
    let cookie = format!("a=1; auth_token={valid}; b=2");
    assert_consumer(
        &s.get("/jwt-claims", &[("cookie", &cookie)]).await,
        &jay,
        "jay-iss",
    );
    for (c, errors) in [
        (
            json!({"iss": "jay-iss", "exp": t - 10, "nbf": t - 60}),
            json!({"exp": "token expired"}),
        ),
        (
            json!({"iss": "jay-iss", "exp": t + 3600, "nbf": t + 3600}),
            json!({"nbf": "token not valid yet"}),
        ),
        (
            json!({"iss": "jay-iss", "exp": "tomorrow", "nbf": t - 60}),
            json!({"exp": "must be a number"}),
        ),
        (
            json!({"iss": "jay-iss"}),
            json!({"exp": "must be a number", "nbf": "must be a number"}),
        ),
        (
            json!({"iss": "jay-iss", "exp": t - 10, "nbf": t + 3600}),
            json!({"exp": "token expired", "nbf": "token not valid yet"}),
        ),
    ] {
        let a = s
            .get("/jwt-claims", &[("authorization", &bearer(&claims(c)))])
            .await;
        assert_401(&a, errors, invalid);
    }
    // maximum_expiration.
    let far = claims(json!({"iss": "jay-iss", "exp": t + 3600}));
    assert_401(
        &s.get("/jwt-max", &[("authorization", &bearer(&far))]).await,
        json!({"exp": "exceeds maximum allowed expiration"}),
        invalid,
    );
    let near = claims(json!({"iss": "jay-iss", "exp": t + 30}));
    assert_consumer(
        &s.get("/jwt-max", &[("authorization", &bearer(&near))])
            .await,
        &jay,
        "jay-iss",
    );

    // realm (without an error: that header changed after 3.9) and
    // run_on_preflight = false.
    assert_401(
        &s.get("/jwt-realm", &[]).await,
        unauthorized.clone(),
        r#"Bearer realm="kong""#,
    );
    let preflight = s.send("OPTIONS", "/jwt-realm", &[], None).await;
    assert_eq!(preflight.status, 200, "{}", preflight.body);
    assert_eq!(preflight.json()["method"], "OPTIONS");
    assert_eq!(preflight.upstream_header("x-consumer-username"), None);
    // run_on_preflight defaults to true.
    assert_eq!(s.send("OPTIONS", "/jwt", &[], None).await.status, 401);

    // secret_is_base64: the stored secret is decoded before verifying.
    let raw = hs(
        Algorithm::HS256,
        json!({"iss": "kim-iss"}),
        "kim-raw-secret",
    );
    assert_consumer(
        &s.get("/jwt-b64", &[("authorization", &bearer(&raw))]).await,
        &kim,
        "kim-iss",
    );
    let encoded = hs(
        Algorithm::HS256,
        json!({"iss": "kim-iss"}),
        &B64.encode("kim-raw-secret"),
    );
    assert_401(
        &s.get("/jwt-b64", &[("authorization", &bearer(&encoded))])
            .await,
        json!({"message": "Invalid signature"}),
        invalid,
    );
    assert_consumer(
        &s.get("/jwt", &[("authorization", &bearer(&encoded))]).await,
        &kim,
        "kim-iss",
    );

    // anonymous.
    assert_anonymous(&s.get("/jwt-anon", &[]).await, &guest);
    assert_anonymous(
        &s.get("/jwt-anon", &[("authorization", &bearer(&cases[6].0))])
            .await,
        &guest,
    );
    assert_consumer(
        &s.get("/jwt-anon", &[("authorization", &bearer(&jay_token))])
            .await,
        &jay,
        "jay-iss",
    );
}

/// An RFC 7231 IMF-fixdate, as `os.date("!%a, %d %b %Y %H:%M:%S GMT")`.
fn http_date(secs: u64) -> String {
    let secs = secs as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {name} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn hmac_b64(algorithm: &str, secret: &str, data: &str) -> String {
    use hmac::{Hmac, Mac};
    fn mac<M: Mac + hmac::digest::KeyInit>(secret: &str, data: &str) -> Vec<u8> {
        let mut m = <M as hmac::digest::KeyInit>::new_from_slice(secret.as_bytes()).expect("key");
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }
    let raw = match algorithm {
        "hmac-sha256" => mac::<Hmac<sha2::Sha256>>(secret, data),
        "hmac-sha384" => mac::<Hmac<sha2::Sha384>>(secret, data),
        "hmac-sha512" => mac::<Hmac<sha2::Sha512>>(secret, data),
        other => panic!("{other}"),
    };
    B64.encode(raw)
}

fn hmac_header(username: &str, algorithm: &str, headers: &str, signature: &str) -> String {
    format!(
        r#"hmac username="{username}", algorithm="{algorithm}", headers="{headers}", signature="{signature}""#
    )
}

#[tokio::test]
async fn hmac_auth_verifies_signatures_clock_skew_and_body_digests() {
    use sha2::Digest as _;

    let mut s = Setup::start();
    for name in ["hmac", "hmac-strict", "hmac-anon"] {
        s.service_route(name, &[&format!("/{name}")]).await;
    }
    let hank = s
        .post(
            "/consumers",
            json!({"username": "hank", "custom_id": "h-1"}),
        )
        .await;
    let guest = s.post("/consumers", json!({"username": "guest"})).await;
    s.post(
        "/consumers/hank/hmac-auth",
        json!({"username": "hank-user", "secret": "hank-secret"}),
    )
    .await;
    s.post("/routes/hmac/plugins", json!({"name": "hmac-auth"}))
        .await;
    s.post(
        "/routes/hmac-strict/plugins",
        json!({"name": "hmac-auth", "config": {"hide_credentials": true, "validate_request_body": true,
               "enforce_headers": ["date", "@request-target"], "algorithms": ["hmac-sha256"],
               "realm": "gatehouse"}}),
    )
    .await;
    s.post(
        "/routes/hmac-anon/plugins",
        json!({"name": "hmac-auth", "config": {"anonymous": "guest"}}),
    )
    .await;
    s.synced().await;

    let date = http_date(now());
    let sha256 = |target: &str| {
        hmac_b64(
            "hmac-sha256",
            "hank-secret",
            &format!("date: {date}\n@request-target: {target}"),
        )
    };
    let signed = |target: &str| {
        hmac_header(
            "hank-user",
            "hmac-sha256",
            "date @request-target",
            &sha256(target),
        )
    };
    let not_valid = json!({"message": "HMAC signature cannot be verified"});
    let not_same = json!({"message": "HMAC signature does not match"});
    let no_date = json!({"message": "HMAC signature cannot be verified, a valid date or x-date header is required for HMAC Authentication"});

    // Missing: hmac-auth/access.lua do_authentication.
    assert_401_error(
        &s.get("/hmac", &[("date", &date)]).await,
        json!({"message": "Unauthorized"}),
        "hmac",
    );
    // The request target is the client's method (lower case), path and query.
    let auth = signed("get /hmac?a=1&b=%2F");
    let ok = s
        .get(
            "/hmac?a=1&b=%2F",
            &[("date", &date), ("authorization", &auth)],
        )
        .await;
    assert_consumer(&ok, &hank, "hank-user");
    assert_eq!(
        ok.upstream_header("authorization").as_deref(),
        Some(&*auth),
        "kept without hide_credentials"
    );
    assert_consumer(
        &s.get(
            "/hmac?a=1&b=%2F",
            &[("date", &date), ("proxy-authorization", &auth)],
        )
        .await,
        &hank,
        "hank-user",
    );
    // Other digests; x-date instead of date; a signed header the request
    // lacks counts as "name:".
    let sig = hmac_b64(
        "hmac-sha512",
        "hank-secret",
        &format!("x-date: {date}\nx-missing:"),
    );
    let ok = s
        .get(
            "/hmac",
            &[
                (
                    "authorization",
                    &hmac_header("hank-user", "hmac-sha512", "x-date x-missing", &sig),
                ),
                ("x-date", &date),
            ],
        )
        .await;
    assert_consumer(&ok, &hank, "hank-user");
    let sig = hmac_b64(
        "hmac-sha384",
        "hank-secret",
        &format!("date: {date}\nx-custom: v"),
    );
    let ok = s
        .get(
            "/hmac",
            &[
                ("date", &date),
                ("x-custom", "v"),
                (
                    "authorization",
                    &hmac_header("hank-user", "hmac-sha384", "date x-custom", &sig),
                ),
            ],
        )
        .await;
    assert_consumer(&ok, &hank, "hank-user");

    // request-line: method, path with query and HTTP version.
    let line = hmac_header(
        "hank-user",
        "hmac-sha256",
        "date request-line",
        &hmac_b64(
            "hmac-sha256",
            "hank-secret",
            &format!("date: {date}\nGET /hmac?q=1 HTTP/1.1"),
        ),
    );
    assert_consumer(
        &s.get("/hmac?q=1", &[("date", &date), ("authorization", &line)])
            .await,
        &hank,
        "hank-user",
    );
    assert_401_error(
        &s.get("/hmac?q=2", &[("date", &date), ("authorization", &line)])
            .await,
        not_same.clone(),
        "hmac",
    );

    // Tampered: another query, another method, another signed header value.
    for (method, path) in [("GET", "/hmac?a=2&b=%2F"), ("DELETE", "/hmac?a=1&b=%2F")] {
        let h = [("date", date.as_str()), ("authorization", auth.as_str())];
        let a = s.send(method, path, &h, None).await;
        assert_401_error(&a, not_same.clone(), "hmac");
    }
    let bad_b64 = hmac_header(
        "hank-user",
        "hmac-sha256",
        "date @request-target",
        "not base64!!!",
    );
    assert_401_error(
        &s.get("/hmac", &[("date", &date), ("authorization", &bad_b64)])
            .await,
        not_same.clone(),
        "hmac",
    );
    // Unknown user, unparsable header, unsupported algorithm.
    for header in [
        hmac_header(
            "nobody",
            "hmac-sha256",
            "date @request-target",
            &sha256("get /hmac"),
        ),
        "hmac username".to_owned(),
        "asd".to_owned(),
        hmac_header(
            "hank-user",
            "hmac-md5",
            "date @request-target",
            &sha256("get /hmac"),
        ),
    ] {
        let a = s
            .get("/hmac", &[("date", &date), ("authorization", &header)])
            .await;
        assert_401_error(&a, not_valid.clone(), "hmac");
    }
    // Clock skew (default 300 s), a missing or unparsable date.
    let old = http_date(now() - 600);
    let stale = hmac_header(
        "hank-user",
        "hmac-sha256",
        "date @request-target",
        &hmac_b64(
            "hmac-sha256",
            "hank-secret",
            &format!("date: {old}\n@request-target: get /hmac"),
        ),
    );
    for headers in [
        vec![("date", old.as_str()), ("authorization", stale.as_str())],
        vec![("authorization", auth.as_str())],
        vec![("date", "yesterday"), ("authorization", auth.as_str())],
    ] {
        let a = s.get("/hmac", &headers).await;
        assert_401_error(&a, no_date.clone(), "hmac");
    }

    // Strict route: realm, enforced headers, algorithms, body digest,
    // hide_credentials.
    let realm = r#"hmac realm="gatehouse""#;
    assert_401_error(
        &s.get("/hmac-strict", &[("date", &date)]).await,
        json!({"message": "Unauthorized"}),
        realm,
    );
    let date_only = hmac_header(
        "hank-user",
        "hmac-sha256",
        "date",
        &hmac_b64("hmac-sha256", "hank-secret", &format!("date: {date}")),
    );
    assert_401_error(
        &s.get(
            "/hmac-strict",
            &[("date", &date), ("authorization", &date_only)],
        )
        .await,
        not_valid.clone(),
        realm,
    );
    let sha512 = hmac_header(
        "hank-user",
        "hmac-sha512",
        "date @request-target",
        &hmac_b64(
            "hmac-sha512",
            "hank-secret",
            &format!("date: {date}\n@request-target: get /hmac-strict"),
        ),
    );
    assert_401_error(
        &s.get(
            "/hmac-strict",
            &[("date", &date), ("authorization", &sha512)],
        )
        .await,
        not_valid.clone(),
        realm,
    );
    // No body and no digest is fine.
    let ok = s
        .get(
            "/hmac-strict",
            &[
                ("date", &date),
                ("authorization", &signed("get /hmac-strict")),
            ],
        )
        .await;
    assert_consumer(&ok, &hank, "hank-user");
    assert_eq!(ok.upstream_header("authorization"), None, "hidden");
    // A body with its digest, signed.
    let body = r#"{"a":"apple","b":"ball"}"#;
    let digest = format!("SHA-256={}", B64.encode(sha2::Sha256::digest(body)));
    let with_digest = |digest: &str| {
        hmac_header(
            "hank-user",
            "hmac-sha256",
            "date @request-target digest",
            &hmac_b64(
                "hmac-sha256",
                "hank-secret",
                &format!("date: {date}\n@request-target: post /hmac-strict\ndigest: {digest}"),
            ),
        )
    };
    let ok = s
        .send(
            "POST",
            "/hmac-strict",
            &[
                ("date", &date),
                ("digest", &digest),
                ("authorization", &with_digest(&digest)),
            ],
            Some(("application/json", body)),
        )
        .await;
    assert_consumer(&ok, &hank, "hank-user");
    assert_eq!(ok.json()["body"], body);
    assert_eq!(ok.upstream_header("authorization"), None);
    // Another body under the same digest; a signed but wrong digest; a body
    // without a digest.
    let other = s
        .send(
            "POST",
            "/hmac-strict",
            &[
                ("date", &date),
                ("digest", &digest),
                ("authorization", &with_digest(&digest)),
            ],
            Some(("application/json", "abc")),
        )
        .await;
    assert_401_error(&other, not_same.clone(), realm);
    let wrong = format!("SHA-256={}", B64.encode(sha2::Sha256::digest("abc")));
    let a = s
        .send(
            "POST",
            "/hmac-strict",
            &[
                ("date", &date),
                ("digest", &wrong),
                ("authorization", &with_digest(&wrong)),
            ],
            Some(("application/json", body)),
        )
        .await;
    assert_401_error(&a, not_same.clone(), realm);
    let a = s
        .send(
            "POST",
            "/hmac-strict",
            &[
                ("date", &date),
                ("authorization", &signed("post /hmac-strict")),
            ],
            Some(("application/json", body)),
        )
        .await;
    assert_401_error(&a, not_same.clone(), realm);

    // anonymous.
    assert_anonymous(&s.get("/hmac-anon", &[]).await, &guest);
    assert_anonymous(
        &s.get("/hmac-anon", &[("date", &date), ("authorization", &auth)])
            .await,
        &guest,
    );
    assert_consumer(
        &s.get(
            "/hmac-anon",
            &[
                ("date", &date),
                ("authorization", &signed("get /hmac-anon")),
            ],
        )
        .await,
        &hank,
        "hank-user",
    );
}
