//! `kubectl audtoken inspect NAME`: the decoded header and claims of the token in the
//! Secret, never the token itself, and whether it is what the AudienceToken asks for.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use serde::Serialize;
use serde_json::Value;

use super::{Ctx, Output, api_error, exit, print_structured, relative, seconds};
use crate::api::AudienceToken;
use crate::oauth::jwt::{self, Claims};
use crate::secret::{SPEC_HASH_ANNOTATION, keys, spec_hash};

/// One check of the token against the AudienceToken.
#[derive(Clone, Debug, Serialize)]
struct Check {
    what: &'static str,
    ok: bool,
    detail: String,
}

/// What `inspect` reports (also its `-o json|yaml`). Holds no token.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Inspection {
    name: String,
    namespace: String,
    secret: String,
    token_type: Option<String>,
    /// `jwt`, or `opaque` (nothing can be decoded).
    format: &'static str,
    header: Option<Value>,
    claims: Option<Value>,
    checks: Vec<Check>,
    /// Whether every check passed.
    as_asked: bool,
}

pub(super) async fn run(ctx: &Ctx, name: &str) -> anyhow::Result<u8> {
    let token = ctx.token(name).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = secrets.get(token.secret_name()).await.map_err(|e| {
        api_error(
            &format!(
                "Secret {}/{} (`kubectl audtoken status {name}` works without reading it)",
                ctx.namespace,
                token.secret_name()
            ),
            e,
        )
    })?;
    let inspection = inspect(&token, &secret, ctx.now);
    match ctx.output {
        Output::Table => print!("{}", text(&inspection, ctx.now)),
        structured => print_structured(structured, &inspection)?,
    }
    Ok(if inspection.as_asked {
        exit::HEALTHY
    } else {
        exit::MISMATCH
    })
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Decodes and checks; the access token is read here and goes nowhere else.
fn inspect(token: &AudienceToken, secret: &Secret, now: Timestamp) -> Inspection {
    let access_token = data(secret, keys::TOKEN).unwrap_or_default();
    let claims = jwt::decode_claims(&access_token);
    let header = claims.as_ref().and_then(|_| {
        let header = access_token.split('.').next()?;
        serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()
    });
    let token_type = data(secret, keys::TOKEN_TYPE);
    let mut checks = Vec::new();
    let mut check = |what, ok, detail: String| checks.push(Check { what, ok, detail });

    let expected = token.expected_audience();
    match &claims {
        Some(claims) => {
            check(
                "audience",
                jwt::check_audience(claims, expected).is_ok(),
                format!("aud {:?}, asked for exactly {expected:?}", claims.aud),
            );
            scopes_check(claims, &token.spec.scopes, &mut check);
            match claims.exp.and_then(|exp| Timestamp::from_second(exp).ok()) {
                Some(exp) => check(
                    "expiry",
                    exp > now,
                    format!("exp {} ({})", seconds(exp), relative(exp, now)),
                ),
                None => check("expiry", false, "the token has no exp".into()),
            }
        }
        None => {
            let audience = data(secret, keys::AUDIENCE).unwrap_or_default();
            check(
                "audience",
                audience == expected,
                format!(
                    "opaque token: its audience cannot be read; the Secret says {audience:?}, asked for {expected:?}"
                ),
            );
            let expires = data(secret, keys::EXPIRES_AT).and_then(|e| e.parse::<Timestamp>().ok());
            check(
                "expiry",
                expires.is_some_and(|e| e > now),
                expires.map_or_else(
                    || "the Secret has no readable expires-at".into(),
                    |e| format!("the Secret says {} ({})", seconds(e), relative(e, now)),
                ),
            );
        }
    }
    if token.spec.dpop.is_some() {
        let jkt = data(secret, keys::DPOP_JKT);
        let bound = claims
            .as_ref()
            .and_then(jwt::confirmation_jkt)
            .map(str::to_string);
        check(
            "DPoP binding",
            token_type.as_deref() == Some("DPoP")
                && jkt.is_some()
                && (claims.is_none() || bound == jkt),
            format!(
                "token type {}, cnf.jkt {}, the Secret's key {}",
                token_type.as_deref().unwrap_or("-"),
                bound.as_deref().unwrap_or("-"),
                jkt.as_deref().unwrap_or("-")
            ),
        );
    }
    let current = spec_hash(&token.spec);
    let published_for = secret.annotations().get(SPEC_HASH_ANNOTATION);
    check(
        "issued for the current spec",
        published_for == Some(&current),
        match published_for {
            Some(hash) if *hash == current => {
                "the Secret's spec-hash matches the AudienceToken's spec".into()
            }
            Some(_) => "the spec changed since this token was issued; a new one is due".into(),
            None => "the Secret has no spec-hash annotation".into(),
        },
    );
    let as_asked = checks.iter().all(|c| c.ok);
    Inspection {
        name: token.name_any(),
        namespace: token.namespace().unwrap_or_default(),
        secret: token.secret_name().to_string(),
        token_type,
        format: if claims.is_some() { "jwt" } else { "opaque" },
        header,
        claims: claims.map(|c| Value::Object(c.raw)),
        checks,
        as_asked,
    }
}

/// Every scope asked for is granted (servers may grant fewer; the operator publishes what
/// they granted).
fn scopes_check(
    claims: &Claims,
    requested: &[String],
    check: &mut impl FnMut(&'static str, bool, String),
) {
    match &claims.scopes {
        Some(granted) => {
            let missing: Vec<&String> = requested.iter().filter(|s| !granted.contains(s)).collect();
            check(
                "scopes",
                missing.is_empty(),
                if missing.is_empty() {
                    format!("granted {}", granted.join(" "))
                } else {
                    format!(
                        "granted {}; not granted: {}",
                        granted.join(" "),
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                },
            );
        }
        None if requested.is_empty() => {}
        None => check(
            "scopes",
            true,
            "the token carries no scope claim; the server's grant is not visible in it".into(),
        ),
    }
}

fn text(inspection: &Inspection, now: Timestamp) -> String {
    let mut out = format!(
        "AudienceToken {}/{}, Secret {}: {} token{}\n",
        inspection.namespace,
        inspection.name,
        inspection.secret,
        inspection.format,
        inspection
            .token_type
            .as_deref()
            .map(|t| format!(", type {t}"))
            .unwrap_or_default()
    );
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    if let Some(header) = &inspection.header {
        out.push_str(&format!("\nHeader:\n{}\n", pretty(header)));
    }
    if let Some(claims) = &inspection.claims {
        out.push_str(&format!("\nClaims:\n{}\n", pretty(claims)));
        for (claim, label) in [("iat", "issued"), ("exp", "expires"), ("nbf", "not before")] {
            if let Some(at) = claims[claim]
                .as_i64()
                .and_then(|s| Timestamp::from_second(s).ok())
            {
                out.push_str(&format!(
                    "  {label}: {} ({})\n",
                    seconds(at),
                    relative(at, now)
                ));
            }
        }
    }
    out.push_str("\nChecks:\n");
    for c in &inspection.checks {
        out.push_str(&format!(
            "  [{}] {}: {}\n",
            if c.ok { "ok" } else { "FAIL" },
            c.what,
            c.detail
        ));
    }
    out.push_str(if inspection.as_asked {
        "\nThe token is what the AudienceToken asks for.\n"
    } else {
        "\nThe token is NOT what the AudienceToken asks for.\n"
    });
    out
}
