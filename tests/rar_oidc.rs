//! Rich authorization requests (RFC 9396) through the library's OAuth client against a real
//! authorization server (`tests/oidc-server`, oidc-provider with `richAuthorizationRequests`
//! and the type `helseid_authorization`): details sent as the `authorization_details` form
//! parameter are granted and come back in the token response (and the JWT), for the
//! client-credentials and the refresh-token grant; details the server does not accept are
//! refused with its error; details sent in the client assertion (`assertion_details`, as
//! HelseID reads them) reach the server inside the assertion, exactly as given.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use audience_token_operator::oauth::assertion::ClientKey;
use audience_token_operator::oauth::jwt::decode_claims;
use audience_token_operator::oauth::{
    AudienceParam, AuthorizationDetails, Binding, ClientCredentials, DetailsLocation, Endpoint,
    Grant, TokenClient, TokenError, TokenRequest, issue,
};
use audience_token_operator::redact::SecretString;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use serde_json::{Value, json};
use support::oidc::{M2M_BASIC, M2M_JWT_ES256, M2M_REFRESH, ORDERS, OidcServer, PAYMENTS};
use support::scenarios::authorization_details::helseid;

fn details(list: Vec<Value>, location: DetailsLocation) -> AuthorizationDetails {
    AuthorizationDetails::new(list, location).expect("valid authorization details")
}

fn request(grant: Grant, resource: &str, details: AuthorizationDetails) -> TokenRequest {
    TokenRequest {
        grant,
        scopes: vec![],
        audience: AudienceParam::Resource(resource.to_string()),
        dpop: None,
        authorization_details: Some(details),
    }
}

fn basic(idp: &OidcServer) -> Endpoint {
    idp.endpoint(
        M2M_BASIC.id,
        ClientCredentials::Basic(SecretString::new(M2M_BASIC.secret)),
    )
}

/// The payload of a JWT, without a signature check.
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

#[tokio::test]
async fn details_in_the_form_are_granted_and_come_back_in_the_response() {
    let idp = OidcServer::start().await;
    let wanted = vec![helseid("999977775", "999977776")];
    let req = request(
        Grant::ClientCredentials,
        ORDERS,
        details(wanted.clone(), DetailsLocation::TokenRequest),
    );
    let response = TokenClient::new()
        .unwrap()
        .request(&basic(&idp), &req)
        .await
        .expect("a token with the details");
    assert_eq!(
        response.authorization_details, wanted,
        "the response lists what was granted (RFC 9396 §7)"
    );
    let claims = decode_claims(response.access_token.expose()).expect("a JWT");
    assert_eq!(
        claims.aud,
        vec![ORDERS.to_string()],
        "still single-audience"
    );
    assert_eq!(claims.raw["authorization_details"], json!(wanted));

    let issued = issue(
        response,
        Timestamp::now(),
        Duration::from_secs(300),
        ORDERS,
        &[],
        Binding::NONE,
    )
    .expect("the token passes the checks");
    assert_eq!(issued.authorization_details, wanted, "carried to the token");

    // The same client without details: nothing granted, nothing listed.
    let plain = TokenRequest {
        authorization_details: None,
        ..req
    };
    let response = TokenClient::new()
        .unwrap()
        .request(&basic(&idp), &plain)
        .await
        .expect("a plain token");
    assert!(response.authorization_details.is_empty());
    let claims = decode_claims(response.access_token.expose()).expect("a JWT");
    assert!(claims.raw.get("authorization_details").is_none());
}

#[tokio::test]
async fn the_refresh_token_grant_sends_them_too() {
    let idp = OidcServer::start().await;
    let refresh_token = idp
        .mint_refresh_token(M2M_REFRESH.id, &[ORDERS, PAYMENTS], None)
        .await;
    let wanted = vec![helseid("1", "2"), helseid("1", "3")];
    let response = TokenClient::new()
        .unwrap()
        .request(
            &idp.endpoint(
                M2M_REFRESH.id,
                ClientCredentials::Basic(SecretString::new(M2M_REFRESH.secret)),
            ),
            &request(
                Grant::RefreshToken(SecretString::new(refresh_token)),
                PAYMENTS,
                details(wanted.clone(), DetailsLocation::TokenRequest),
            ),
        )
        .await
        .expect("a refreshed token with the details");
    assert_eq!(response.authorization_details, wanted);
    assert!(
        response.refresh_token.is_some(),
        "the chain rotates as ever"
    );
}

#[tokio::test]
async fn details_the_server_does_not_accept_are_refused_with_its_error() {
    let idp = OidcServer::start().await;
    let tokens = TokenClient::new().unwrap();
    let refused = |result: Result<_, TokenError>| match result {
        Err(err @ TokenError::Server { status: 400, .. }) => err,
        Err(other) => panic!("expected a 400 from the server, got {other}"),
        Ok(_) => panic!("expected a refusal, got a token"),
    };
    let unknown_type = details(
        vec![json!({"type": "payment_initiation", "instructedAmount": {"amount": "1"}})],
        DetailsLocation::TokenRequest,
    );
    let err = refused(
        tokens
            .request(
                &basic(&idp),
                &request(Grant::ClientCredentials, ORDERS, unknown_type),
            )
            .await,
    );
    assert_eq!(err.oauth_error(), Some("invalid_authorization_details"));
    assert!(
        err.to_string()
            .contains("unsupported authorization details type value"),
        "{err}"
    );

    let without_organisation = details(
        vec![json!({"type": "helseid_authorization", "practitioner_role": {}})],
        DetailsLocation::TokenRequest,
    );
    let err = refused(
        tokens
            .request(
                &basic(&idp),
                &request(Grant::ClientCredentials, ORDERS, without_organisation),
            )
            .await,
    );
    assert_eq!(err.oauth_error(), Some("invalid_authorization_details"));
    assert!(
        err.to_string()
            .contains("practitioner_role.organization.identifier.value"),
        "{err}"
    );
    let counts = idp.token_requests().await;
    assert_eq!(
        counts.errors("invalid_authorization_details"),
        2,
        "{counts:?}"
    );
}

#[tokio::test]
async fn details_in_the_client_assertion_reach_the_server_inside_it() {
    let idp = OidcServer::start().await;
    let key = idp.client_private_key(M2M_JWT_ES256.id).await;
    let endpoint = idp.endpoint(
        M2M_JWT_ES256.id,
        ClientCredentials::PrivateKeyJwt {
            key: Arc::new(ClientKey::parse(&key.pem, None, Some(&key.kid)).expect("key")),
            audience: idp.issuer.clone(),
        },
    );
    let wanted = vec![helseid("999977775", "999977776")];
    let response = TokenClient::new()
        .unwrap()
        .request(
            &endpoint,
            &request(
                Grant::ClientCredentials,
                ORDERS,
                details(wanted.clone(), DetailsLocation::ClientAssertion),
            ),
        )
        .await
        .expect("the server accepts an assertion with assertion_details");
    // oidc-provider does not read assertion_details (HelseID does): nothing is granted, and
    // nothing was sent as the form parameter, which it would have granted.
    assert!(response.authorization_details.is_empty());
    let claims = decode_claims(response.access_token.expose()).expect("a JWT");
    assert!(claims.raw.get("authorization_details").is_none());

    let seen = idp.secrets_seen().await;
    let with_details: Vec<Value> = seen
        .client_assertions
        .iter()
        .map(|a| payload(a))
        .filter(|claims| claims.get("assertion_details").is_some())
        .collect();
    assert_eq!(with_details.len(), 1, "{with_details:?}");
    assert_eq!(
        with_details[0]["assertion_details"],
        json!(wanted),
        "exactly the details given"
    );
    assert_eq!(with_details[0]["sub"], M2M_JWT_ES256.id);
}
