//! `List` and `VerifyChain`: paging, filters, and clear errors for bad input.

use brain_ops::pb;
use prost_types::Timestamp;
use tonic::Code;

use crate::helpers::{list_all, record_of, spawn_app};

fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

async fn list_error(
    app: &crate::helpers::TestApp,
    request: pb::AuditServiceListRequest,
) -> tonic::Status {
    app.audit().list(request).await.expect_err("the request is refused")
}

#[tokio::test]
async fn bad_list_input_is_invalid_argument_naming_the_field() {
    let app = spawn_app().await;
    let inverted =
        pb::AuditServiceListRequest { from: ts(2_000), to: ts(1_000), ..Default::default() };
    let equal =
        pb::AuditServiceListRequest { from: ts(1_000), to: ts(1_000), ..Default::default() };
    let zero = pb::AuditServiceListRequest { page_size: Some(0), ..Default::default() };
    let huge = pb::AuditServiceListRequest { page_size: Some(1_000_000), ..Default::default() };
    let nanos = pb::AuditServiceListRequest {
        from: Some(Timestamp { seconds: 1, nanos: -1 }),
        ..Default::default()
    };
    for (request, field) in [
        (inverted, "to"),
        (equal, "to"),
        (zero, "page_size"),
        (huge, "page_size"),
        (nanos, "from.nanos"),
    ] {
        let status = list_error(&app, request).await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{field}: {}", status.message());
    }
}

#[tokio::test]
async fn bad_verify_ranges_are_invalid_argument_naming_the_field() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.record("test.verify", &format!("{i}")).await;
    }
    let mut audit = app.audit();
    let beyond = audit
        .verify_chain(pb::VerifyChainRequest { from_seq: 1, to_seq: 4 })
        .await
        .expect_err("beyond the head");
    assert_eq!(beyond.code(), Code::InvalidArgument);
    assert!(
        beyond.message().starts_with("to_seq 4 is beyond the head seq 3"),
        "{}",
        beyond.message()
    );
    let inverted = audit
        .verify_chain(pb::VerifyChainRequest { from_seq: 3, to_seq: 2 })
        .await
        .expect_err("inverted");
    assert!(inverted.message().starts_with("from_seq"), "{}", inverted.message());
    let part = audit
        .verify_chain(pb::VerifyChainRequest { from_seq: 2, to_seq: 3 })
        .await
        .expect("a sub-range verifies")
        .into_inner();
    assert!(part.valid);
    assert_eq!(part.checked, 2);
    assert_eq!(part.head_seq, 3);
}

#[tokio::test]
async fn an_empty_ledger_lists_nothing_and_verifies() {
    let app = spawn_app().await;
    assert!(app.list_all().await.is_empty());
    let report = app
        .audit()
        .verify_chain(pb::VerifyChainRequest::default())
        .await
        .expect("verifies")
        .into_inner();
    assert!(report.valid);
    assert_eq!((report.checked, report.head_seq), (0, 0));
    assert_eq!(report.head_hash, "0".repeat(64));
}

#[tokio::test]
async fn pages_return_every_event_once_in_seq_order() {
    let app = spawn_app().await;
    for i in 0..25 {
        app.record("test.paging", &format!("{i}")).await;
    }
    let mut audit = app.audit();
    let mut seen = Vec::new();
    let mut request = pb::AuditServiceListRequest { page_size: Some(7), ..Default::default() };
    loop {
        let page = audit.list(request.clone()).await.expect("lists").into_inner();
        assert!(page.events.len() <= 7);
        seen.extend(page.events.iter().map(|e| e.seq));
        if page.next_after_seq == 0 {
            break;
        }
        request.after_seq = page.next_after_seq;
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_type_prefix_and_half_open_time_range_filter() {
    let app = spawn_app().await;
    app.record("factory.step_failed", "a").await;
    app.record("sovereign.mode_changed", "b").await;
    app.record("factory.step_completed", "c").await;
    let mut audit = app.audit();
    let factory = list_all(
        &mut audit,
        pb::AuditServiceListRequest { event_type_prefix: "factory.".into(), ..Default::default() },
    )
    .await;
    assert_eq!(factory.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);

    let all = app.list_all().await;
    let second = all[1].time.expect("time");
    let from_second = list_all(
        &mut audit,
        pb::AuditServiceListRequest { from: Some(second), ..Default::default() },
    )
    .await;
    assert!(from_second.iter().all(|e| e.time.expect("time").seconds >= second.seconds));
    assert!(from_second.iter().any(|e| e.seq == 2), "from is inclusive");
    let before_second = list_all(
        &mut audit,
        pb::AuditServiceListRequest { to: Some(second), ..Default::default() },
    )
    .await;
    assert!(before_second.iter().all(|e| e.seq < 2 || e.time != Some(second)), "to is exclusive");
    assert_eq!(record_of(&all[1])["event_type"], "sovereign.mode_changed");
}
