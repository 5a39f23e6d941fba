//! Emergency overrides: granted by operators, consumed once, refused and recorded when reused,
//! expired or revoked, rebuilt from the ledger, and never a way around safe mode.

use brain_ops::pb;
use brain_ops::pb::override_service_client::OverrideServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, record_of, spawn_app, spawn_app_in};
use crate::metrics::{mode_change, report, scrape, value};

fn overrides(app: &TestApp) -> OverrideServiceClient<Channel> {
    OverrideServiceClient::new(app.channel.clone())
}

async fn grant(app: &TestApp, ttl_seconds: u32) -> pb::GrantResponse {
    overrides(app)
        .grant(pb::GrantRequest {
            reason: "IPv6 gate down during incident 42".into(),
            ttl_seconds,
            scope: "sovereign.mode_change".into(),
        })
        .await
        .expect("granted")
        .into_inner()
}

async fn consume(app: &TestApp, token: &str) -> Result<pb::Override, tonic::Status> {
    overrides(app)
        .consume(pb::ConsumeRequest { token: token.into(), purpose: "switch to sovereign".into() })
        .await
        .map(|r| r.into_inner().r#override.expect("override"))
}

async fn active_gauge(app: &TestApp) -> f64 {
    value(&scrape(app).await, "brain_override_active")
}

/// The records of `event_type`, as JSON.
async fn records(app: &TestApp, event_type: &str) -> Vec<serde_json::Value> {
    app.list_all().await.iter().filter(|e| e.event_type == event_type).map(record_of).collect()
}

#[tokio::test]
async fn an_override_is_consumed_once_and_every_later_use_is_refused_and_recorded() {
    let app = spawn_app().await;
    assert_eq!(active_gauge(&app).await, 0.0);
    let granted = grant(&app, 600).await;
    let id = granted.r#override.as_ref().expect("override").id.clone();
    assert!(granted.token.starts_with("brainovr_") && granted.token.len() > 60);
    assert_eq!(granted.r#override.as_ref().expect("override").state(), pb::OverrideState::Active);
    assert_eq!(active_gauge(&app).await, 1.0);

    let consumed = consume(&app, &granted.token).await.expect("the first use succeeds");
    assert_eq!(
        (consumed.id.as_str(), consumed.state()),
        (id.as_str(), pb::OverrideState::Consumed)
    );
    assert_eq!(consumed.consumed_by, "anonymous");
    assert_eq!(consumed.purpose, "switch to sovereign");
    assert_eq!(active_gauge(&app).await, 0.0, "the gauge drops when it is consumed");

    let again = consume(&app, &granted.token).await.expect_err("a second use is refused");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("consumed"), "{}", again.message());
    let denied = records(&app, "override.reuse_denied").await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["severity"], "critical");
    assert_eq!(denied[0]["metadata"]["override_id"], id.as_str());
    assert_eq!(denied[0]["metadata"]["state"], "consumed");

    let granted_event = &records(&app, "override.granted").await[0];
    assert_eq!(granted_event["severity"], "warning");
    assert_eq!(
        granted_event["metadata"]["token_sha256"],
        brain_ops::overrides::digest(&granted.token)
    );
    let everything = serde_json::to_string(
        &app.list_everything().await.iter().map(record_of).collect::<Vec<_>>(),
    )
    .expect("JSON");
    assert!(!everything.contains(&granted.token), "the token itself is never stored");
    assert_eq!(records(&app, "override.consumed").await.len(), 1);
}

#[tokio::test]
async fn an_override_expires_on_its_own_and_is_refused_afterwards() {
    let app = spawn_app().await;
    let granted = grant(&app, 60).await;
    let id = granted.r#override.as_ref().expect("override").id.clone();
    assert_eq!(active_gauge(&app).await, 1.0);
    app.clock.step(61_000_000);
    assert_eq!(active_gauge(&app).await, 0.0, "the gauge follows expiry at once");
    // No override call is made: the service records the expiry by itself.
    let mut expired = Vec::new();
    for _ in 0..100 {
        expired = records(&app, "override.expired").await;
        if !expired.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(expired.len(), 1, "override.expired is recorded without any request");
    assert_eq!(expired[0]["metadata"]["override_id"], id.as_str());
    assert_eq!(expired[0]["source"], "brain-ops");

    let late = consume(&app, &granted.token).await.expect_err("expired");
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("expired"), "{}", late.message());
    let denied = records(&app, "override.reuse_denied").await;
    assert_eq!(denied[0]["metadata"]["state"], "expired");
    assert_eq!(records(&app, "override.expired").await.len(), 1, "recorded once");
}

#[tokio::test]
async fn a_revoked_override_is_refused_and_cannot_be_revoked_twice() {
    let app = spawn_app().await;
    let granted = grant(&app, 600).await;
    let id = granted.r#override.as_ref().expect("override").id.clone();
    let revoked = overrides(&app)
        .revoke(pb::RevokeRequest { id: id.clone(), reason: "incident closed".into() })
        .await
        .expect("revoked")
        .into_inner()
        .r#override
        .expect("override");
    assert_eq!(revoked.state(), pb::OverrideState::Revoked);
    assert_eq!(revoked.revoke_reason, "incident closed");
    assert_eq!(active_gauge(&app).await, 0.0);

    let refused = consume(&app, &granted.token).await.expect_err("revoked");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(records(&app, "override.reuse_denied").await[0]["metadata"]["state"], "revoked");

    let twice = overrides(&app)
        .revoke(pb::RevokeRequest { id: id.clone(), reason: "again".into() })
        .await
        .expect_err("already revoked");
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let unknown = overrides(&app)
        .revoke(pb::RevokeRequest { id: "ovr-nothing".into(), reason: "typo".into() })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(records(&app, "override.revoked").await.len(), 1);
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let app = spawn_app().await;
    let request = |reason: &str, ttl_seconds, scope: &str| pb::GrantRequest {
        reason: reason.into(),
        ttl_seconds,
        scope: scope.into(),
    };
    for (bad, field) in [
        (request("too short", 600, "sovereign.mode_change"), "reason"),
        (request("a good long reason", 59, "sovereign.mode_change"), "ttl_seconds"),
        (request("a good long reason", 86_401, "sovereign.mode_change"), "ttl_seconds"),
        (request("a good long reason", 600, ""), "scope"),
        (request("a good long reason", 600, "Sovereign Mode"), "scope"),
    ] {
        let refused = overrides(&app).grant(bad).await.expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().starts_with(field), "{field}: {}", refused.message());
    }
    let unknown = consume(&app, "brainovr_0000").await.expect_err("unknown token");
    assert_eq!(unknown.code(), Code::NotFound);
    let empty = consume(&app, "").await.expect_err("no token");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().starts_with("token"));
    assert!(records(&app, "override.granted").await.is_empty(), "nothing was granted");
}

#[tokio::test]
async fn two_callers_racing_for_one_token_cannot_both_win() {
    let app = spawn_app().await;
    let token = grant(&app, 600).await.token;
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = overrides(&app);
        let token = token.clone();
        racers.spawn(async move {
            client.consume(pb::ConsumeRequest { token, purpose: "race".into() }).await
        });
    }
    let outcomes = racers.join_all().await;
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert_eq!(records(&app, "override.consumed").await.len(), 1);
    assert_eq!(records(&app, "override.reuse_denied").await.len(), 7);
}

#[tokio::test]
async fn overrides_are_rebuilt_from_the_ledger_at_start() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let app = spawn_app_in(dir.path(), |_| {}).await;
    let used = grant(&app, 600).await;
    consume(&app, &used.token).await.expect("consumed");
    let kept = grant(&app, 600).await;
    app.stop().await;

    let app = spawn_app_in(dir.path(), |_| {}).await;
    let listed = overrides(&app)
        .list(pb::OverrideServiceListRequest { include_inactive: true })
        .await
        .expect("listed")
        .into_inner()
        .overrides;
    let state_of = |id: &str| listed.iter().find(|o| o.id == id).map(|o| o.state());
    assert_eq!(
        state_of(&used.r#override.as_ref().expect("o").id),
        Some(pb::OverrideState::Consumed)
    );
    assert_eq!(state_of(&kept.r#override.as_ref().expect("o").id), Some(pb::OverrideState::Active));
    let active = overrides(&app)
        .list(pb::OverrideServiceListRequest { include_inactive: false })
        .await
        .expect("listed")
        .into_inner()
        .overrides;
    assert_eq!(active.len(), 1);
    assert_eq!(active_gauge(&app).await, 1.0);
    assert_eq!(
        consume(&app, &used.token).await.expect_err("still used").code(),
        Code::FailedPrecondition
    );
    consume(&app, &kept.token).await.expect("the kept one still works once");
}

#[tokio::test]
async fn a_consumed_override_never_lifts_safe_mode() {
    let app = spawn_app().await;
    app.safe_mode().enable(pb::EnableRequest { reason: "freeze".into() }).await.expect("enabled");
    let granted = grant(&app, 600).await;
    consume(&app, &granted.token).await.expect("consumed");
    let check = app
        .safe_mode()
        .check_operation(pb::CheckOperationRequest {
            kind: pb::OperationKind::Execution.into(),
            operation: "run-1".into(),
        })
        .await
        .expect("answers")
        .into_inner();
    assert!(!check.allowed, "still blocked with a consumed override");
    assert!(app.status().await.enabled);
}

#[tokio::test]
async fn a_forced_action_naming_a_consumed_override_is_not_a_violation() {
    let app = spawn_app().await;
    let granted = grant(&app, 600).await;
    let id = granted.r#override.as_ref().expect("override").id.clone();
    let mut forced = mode_change(pb::OperationMode::Online, pb::OperationMode::Sovereign);
    forced.metadata.insert("forced".into(), "true".into());
    forced.metadata.insert("override_id".into(), id.clone());
    // Granted but not yet consumed: a violation.
    report(&app, forced.clone()).await;
    assert_eq!(records(&app, "system.override_violation").await.len(), 1);
    consume(&app, &granted.token).await.expect("consumed");
    report(&app, forced).await;
    assert_eq!(records(&app, "system.override_violation").await.len(), 1, "no new violation");
}
