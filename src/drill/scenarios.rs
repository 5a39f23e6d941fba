//! The five drills. Each plays its incident over gRPC and records a step per check; a call the
//! drill cannot do without ends it (`Stop`) after recording why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tonic::Code;

use super::sibling::{Sibling, View};
use super::{Report, STALENESS_BUDGET, Stop, Target, local};
use crate::cli::Bearer;
use crate::evidence::keys::key_id_of;
use crate::ledger::store::{SledOptions, SledStore, Storage};
use crate::pb;

fn with(mut event: pb::Event, edit: impl FnOnce(&mut pb::Event)) -> pb::Event {
    edit(&mut event);
    event
}

fn meta(event: &mut pb::Event, pairs: &[(&str, &str)]) {
    for (k, v) in pairs {
        event.metadata.insert((*k).to_owned(), (*v).to_owned());
    }
}

/// Drill 1: the bundle manager reports a bundle whose hash does not match.
pub(super) async fn invalid_bundle(t: &mut Target, r: &mut Report) -> Result<(), Stop> {
    let bundle = format!("{}-bundle", r.drill_id);
    let before = t.summary(r).await?.quarantines;
    let metric_before = t.metric("brain_quarantine_total").await;
    let quarantine = |r: &Report| {
        with(Target::event(r, "sovereign.bundle_quarantined"), |e| {
            e.bundle_id.clone_from(&bundle);
            e.success = Some(false);
            e.reason = "bundle hash does not match its manifest".into();
            meta(e, &[("expected_sha256", &"a".repeat(64)), ("actual_sha256", &"b".repeat(64))]);
        })
    };
    let first = t.report_event(r, quarantine(r)).await?;
    let record = t.record(r, first).await?;
    r.check(
        "the quarantine is a WARNING event with both hashes",
        record["severity"] == "warning"
            && record["metadata"]["expected_sha256"] == "a".repeat(64)
            && record["metadata"]["actual_sha256"] == "b".repeat(64),
        format!("seq {first}, severity {}", record["severity"]),
    );
    let after = t.summary(r).await?.quarantines;
    r.check("brain_quarantine_total +1", after == before + 1, format!("{before} -> {after}"));
    if let (Some(b), Some(a)) = (metric_before, t.metric("brain_quarantine_total").await) {
        r.check("/metrics agrees", a == b + 1.0, format!("brain_quarantine_total {b} -> {a}"));
    }

    let repeat = t.report_event(r, quarantine(r)).await?;
    let again = t.summary(r).await?.quarantines;
    r.check(
        "a repeat for the same bundle does not count twice",
        again == before + 1,
        format!("repeat at seq {repeat}; quarantines {again}"),
    );

    let (pack, answer) = t.pack(r, pb::EvidenceScope::Audit, first, repeat).await?;
    let listed = pack["events"].as_array().is_some_and(|events| {
        events.iter().any(|e| {
            e["event_type"] == "sovereign.bundle_quarantined" && e["bundle_id"] == bundle.as_str()
        })
    });
    r.check(
        "the AUDIT pack shows the quarantine",
        listed && pack["bundle_summary"]["quarantined"] == 2,
        format!(
            "{} ({} events), bundle_summary {}",
            answer.pack_id, answer.events_included, pack["bundle_summary"]
        ),
    );

    let release = |r: &Report| {
        with(Target::event(r, "sovereign.bundle_released"), |e| {
            e.bundle_id.clone_from(&bundle);
            e.reason = "bundle rebuilt and verified".into();
        })
    };
    t.report_event(r, release(r)).await?;
    t.report_event(r, quarantine(r)).await?;
    let recounted = t.summary(r).await?.quarantines;
    r.check(
        "release and re-quarantine counts again",
        recounted == before + 2,
        format!("quarantines {recounted}"),
    );
    // Leave nothing quarantined behind.
    t.report_event(r, release(r)).await?;
    Ok(())
}

/// Drill 2: an executor step times out during a deployment and is rolled back.
pub(super) async fn executor_crash(t: &mut Target, r: &mut Report) -> Result<(), Stop> {
    let execution = format!("{}-execution", r.drill_id);
    let before = t.summary(r).await?;
    let metric_before = t.metric("brain_executor_failures_total").await;
    let step = |r: &Report, event_type: &str| {
        with(Target::event(r, event_type), |e| {
            meta(e, &[("execution_id", &execution), ("step", "deploy")]);
        })
    };
    let failed = with(step(r, "factory.step_failed"), |e| {
        e.success = Some(false);
        e.error = "step deploy timed out after 300 s".into();
        meta(e, &[("timeout_seconds", "300")]);
    });
    let first = t.report_event(r, failed).await?;
    let rollback = with(step(r, "factory.rollback_started"), |e| {
        e.reason = "step deploy timed out".into();
    });
    let rollback = t.report_event(r, rollback).await?;
    let last = t.report_event(r, step(r, "factory.rollback_completed")).await?;
    let (failed, started) = (t.record(r, first).await?, t.record(r, rollback).await?);
    r.check(
        "step_failed is ERROR, rollback_started WARNING",
        failed["severity"] == "error" && started["severity"] == "warning",
        format!("{} / {}", failed["severity"], started["severity"]),
    );

    let after = t.summary(r).await?;
    r.check(
        "brain_executor_failures_total +1",
        after.executor_failures == before.executor_failures + 1,
        format!("{} -> {}", before.executor_failures, after.executor_failures),
    );
    if let (Some(b), Some(a)) = (metric_before, t.metric("brain_executor_failures_total").await) {
        r.check(
            "/metrics agrees",
            a == b + 1.0,
            format!("brain_executor_failures_total {b} -> {a}"),
        );
    }
    r.check(
        "the last success is unchanged",
        after.last_success == before.last_success,
        format!("{:?}", after.last_success.map(|t| t.seconds)),
    );

    let (pack, answer) = t.pack(r, pb::EvidenceScope::Audit, first, last).await?;
    let executor = &pack["executor_summary"];
    r.check(
        "the executor summary shows one failure and one completed rollback",
        executor["steps_failed"] == 1
            && executor["rollbacks_started"] == 1
            && executor["rollbacks_completed"] == 1,
        format!("{}: {executor}", answer.pack_id),
    );
    Ok(())
}

/// Drill 3: during a freeze, a service tries to lift it, reuses a consumed override, presents
/// an expired one, and the sovereign service reports a forced mode change without one.
pub(super) async fn override_abuse(t: &mut Target, r: &mut Report) -> Result<(), Stop> {
    let Some(service) = t.service.clone() else {
        r.skipped = Some(
            "override-abuse acts as a service principal: pass --service-token (role service)"
                .into(),
        );
        return Ok(());
    };
    // The drill must not try to lift a freeze with a credential that could succeed.
    let probe = t.audit_as(&service).verify_chain(pb::VerifyChainRequest::default()).await;
    r.require(
        "the service credential is held to its role",
        probe.as_ref().is_err_and(|s| s.code() == Code::PermissionDenied),
        match &probe {
            Ok(_) => "VerifyChain was allowed: the target does not enforce roles for it".into(),
            Err(status) => super::describe(status),
        },
    )?;
    let violations_before = t.metric("brain_override_violations_total").await;
    let status = r
        .need("read the status", t.safe_mode(&t.operator).get_status(pb::GetStatusRequest {}))
        .await?;
    let froze = !status.status.is_some_and(|s| s.enabled);
    let outcome = abuse_during_freeze(t, r, &service, froze).await;
    let violations = t.metric("brain_override_violations_total").await;
    if let (Some(b), Some(a)) = (violations_before, violations) {
        r.check("brain_override_violations_total +1", a == b + 1.0, format!("{b} -> {a}"));
    }
    if froze {
        let reason = format!("{}: thaw the freeze the drill made", r.drill_id);
        let thaw = t.safe_mode(&t.operator).disable(pb::DisableRequest { reason }).await;
        r.check(
            "the drill's freeze is lifted",
            thaw.is_ok(),
            thaw.err().map(|s| super::describe(&s)).unwrap_or_default(),
        );
    }
    outcome
}

async fn abuse_during_freeze(
    t: &mut Target,
    r: &mut Report,
    service: &Bearer,
    freeze: bool,
) -> Result<(), Stop> {
    let first = t.head(r).await? + 1;
    if freeze {
        let reason = format!("{}: freeze for the override-abuse drill", r.drill_id);
        r.need("freeze", t.safe_mode(&t.operator).enable(pb::EnableRequest { reason })).await?;
    }
    let drill_id = r.drill_id.clone();
    let grant = |scope: &str| pb::GrantRequest {
        reason: format!("{drill_id}: override-abuse drill"),
        ttl_seconds: 60,
        scope: scope.to_owned(),
    };
    // Granted first, so that its minute runs while the other steps do.
    let expiring =
        r.need("grant an override", t.overrides(&t.operator).grant(grant("drill"))).await?;
    let consumed =
        r.need("grant an override", t.overrides(&t.operator).grant(grant("drill"))).await?;

    let reason = format!("{}: a service tries to lift the freeze", r.drill_id);
    r.refused(
        "a service principal's Disable is refused",
        Code::PermissionDenied,
        "may not call",
        t.safe_mode(service).disable(pb::DisableRequest { reason }),
    )
    .await;

    let consume = |token: &str| pb::ConsumeRequest {
        token: token.to_owned(),
        purpose: "force a mode change past a failed gate".into(),
    };
    let used = r
        .need("consume an override", t.overrides(service).consume(consume(&consumed.token)))
        .await?;
    let used_id = used.r#override.map(|o| o.id).unwrap_or_default();
    r.refused(
        "reusing a consumed override is refused",
        Code::FailedPrecondition,
        "consumed",
        t.overrides(service).consume(consume(&consumed.token)),
    )
    .await;

    let summary = t.summary(r).await?;
    let mode = summary.current_mode;
    let forced = with(Target::event(r, "sovereign.mode_changed"), |e| {
        e.mode_before = mode;
        e.mode_after = pb::OperationMode::Sovereign.into();
        e.reason = "IPv6 gate failed; forcing sovereign mode".into();
        meta(e, &[("forced", "true")]);
    });
    let sovereign = match &t.local {
        Some(server) => Bearer::new(Some(&server.tokens.sovereign)).unwrap_or(service.clone()),
        None => service.clone(),
    };
    t.report_event_as(r, &sovereign, forced).await?;
    // Put the mode back as it was, as a legitimate (not forced) report.
    let restore = with(Target::event(r, "sovereign.mode_changed"), |e| {
        e.mode_before = pb::OperationMode::Sovereign.into();
        e.mode_after = mode;
        e.reason = format!("{}: restore the mode the drill found", r.drill_id);
    });
    t.report_event_as(r, &sovereign, restore).await?;

    let expires = expiring.r#override.as_ref().and_then(|o| o.expires_at).map_or(0, |t| t.seconds);
    let now = chrono::Utc::now().timestamp();
    // The expiry tick runs every second; two more leave room for it.
    tokio::time::sleep(Duration::from_secs((expires - now + 2).clamp(0, 62) as u64)).await;
    r.refused(
        "presenting an expired override is refused",
        Code::FailedPrecondition,
        "expired",
        t.overrides(service).consume(consume(&expiring.token)),
    )
    .await;

    let status = r
        .need("read the status", t.safe_mode(&t.operator).get_status(pb::GetStatusRequest {}))
        .await?;
    r.check(
        "still frozen",
        status.status.as_ref().is_some_and(|s| s.enabled),
        format!("revision {}", status.status.map_or(0, |s| s.revision)),
    );

    let last = t.head(r).await?;
    let (pack, answer) = t.pack(r, pb::EvidenceScope::Internal, first, last).await?;
    let events = pack["events"].as_array().cloned().unwrap_or_default();
    let service_name = t.service_name.clone().unwrap_or_default();
    let find = |event_type: &str, check: &dyn Fn(&Value) -> bool| {
        events.iter().filter(|e| e["event_type"] == event_type && check(e)).count()
    };
    let by_service = |e: &Value| service_name.is_empty() || e["source"] == service_name.as_str();
    // The first refusal from a peer in a second is an event of its own, later ones in that
    // second are summed into one aggregate that lists them.
    let denied = find("system.permission_denied", &|e| {
        let own = by_service(e) && e["metadata"]["rpc"] == "SafeModeService/Disable";
        let listed = e["metadata"]["refusals"].as_str().is_some_and(|refusals| {
            refusals.contains(&format!("{service_name} SafeModeService/Disable"))
        });
        own || listed
    });
    let reuse = find("override.reuse_denied", &by_service);
    let violation = find("system.override_violation", &|e| {
        t.local.is_none() || e["source"] == local::SOVEREIGN
    });
    r.check(
        "the INTERNAL pack lists every attempt with its principal",
        denied >= 1 && reuse >= 2 && violation >= 1,
        format!(
            "{}: permission_denied {denied}, reuse_denied {reuse}, override_violation {violation}; \
             override {used_id} consumed",
            answer.pack_id
        ),
    );
    let critical = events
        .iter()
        .filter(|e| {
            ["system.permission_denied", "override.reuse_denied", "system.override_violation"]
                .contains(&e["event_type"].as_str().unwrap_or(""))
        })
        .all(|e| e["severity"] == "critical");
    r.check("every attempt is CRITICAL", critical, "");
    Ok(())
}

/// Drill 4: a stored record is edited while the service is down.
pub(super) async fn tampered_log(t: &mut Target, r: &mut Report) -> Result<(), Stop> {
    let mut seqs = Vec::new();
    for i in 1..=5 {
        let event = with(Target::event(r, "factory.step_completed"), |e| {
            e.reason = format!("step {i} of the tampered-log drill");
        });
        seqs.push(t.report_event(r, event).await?);
    }
    let (first, last) = (seqs[0], seqs[4]);
    let (_, before) = t.pack(r, pb::EvidenceScope::Internal, first, last).await?;
    let keys = r
        .need("read the public keys", t.evidence().get_public_keys(pb::GetPublicKeysRequest {}))
        .await?;
    let keys: BTreeMap<String, [u8; 32]> = keys
        .keys
        .iter()
        .filter_map(|k| {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD.decode(&k.public_key).ok()?;
            let raw: [u8; 32] = raw.try_into().ok()?;
            Some((key_id_of(&raw), raw))
        })
        .collect();

    let server = t.local.as_mut().ok_or(Stop)?;
    let stopped = server.stop();
    r.require("the service stops cleanly", stopped == Ok(0), format!("{stopped:?}"))?;
    let victim = seqs[2];
    let edited = tamper(&server.data_dir(), victim);
    r.require(
        "a stored record is edited on disk",
        edited.is_ok(),
        format!("seq {victim}: {edited:?}"),
    )?;
    t.restart(r, "the service starts again").await?;

    let status = r
        .need("read the status", t.safe_mode(&t.operator).get_status(pb::GetStatusRequest {}))
        .await?;
    let status = status.status.unwrap_or_default();
    r.check(
        "it starts in safe mode (INTEGRITY)",
        status.enabled && status.source() == pb::SafeModeSource::Integrity,
        status.reason.clone(),
    );
    let counted = t.metric("brain_integrity_violations_total").await;
    r.check(
        "brain_integrity_violations_total counts it",
        counted == Some(1.0),
        format!("{counted:?}"),
    );
    let chain = r
        .need("verify the chain", t.audit().verify_chain(pb::VerifyChainRequest::default()))
        .await?;
    r.check(
        "VerifyChain names the seq",
        !chain.valid && chain.first_bad_seq == victim,
        format!("valid {}, first_bad_seq {}", chain.valid, chain.first_bad_seq),
    );

    let offline = crate::evidence::verify::verify(
        std::io::Cursor::new(before.pack_json.as_bytes()),
        &keys,
        None,
    );
    r.check(
        "the pack exported before still verifies offline",
        offline.as_ref().is_ok_and(|v| v.valid_offline()),
        format!("{}: {:?}", before.pack_id, offline.map(|v| v.problems)),
    );
    let online = r
        .need(
            "verify the pack against the ledger",
            t.evidence().verify(pb::VerifyRequest { pack_json: before.pack_json.clone() }),
        )
        .await?;
    r.check(
        "but it no longer matches the log",
        !online.matches_log && !online.valid,
        online.problems.join("; "),
    );

    let reason = format!("{}: damage at seq {victim} investigated and accepted", r.drill_id);
    let before_thaw = t.head(r).await?;
    r.need("acknowledge and thaw", t.safe_mode(&t.operator).disable(pb::DisableRequest { reason }))
        .await?;
    let records = t.records_after(before_thaw).await.unwrap_or_default();
    let acknowledged = records.iter().find(|e| {
        e["event_type"] == "system.integrity_acknowledged"
            && e["metadata"]["damaged"]
                .as_str()
                .is_some_and(|tags| tags.split(',').any(|t| t.starts_with(&format!("{victim}:"))))
    });
    r.check(
        "the operator's thaw acknowledges the damage",
        acknowledged.is_some(),
        acknowledged
            .map(|e| format!("seq {}: {}", e["seq"], e["metadata"]["damaged"]))
            .unwrap_or_default(),
    );
    let stopped = t.local.as_mut().ok_or(Stop)?.stop();
    r.require("the service stops cleanly again", stopped == Ok(0), format!("{stopped:?}"))?;
    t.restart(r, "the service restarts").await?;
    let status = r
        .need("read the status", t.safe_mode(&t.operator).get_status(pb::GetStatusRequest {}))
        .await?;
    r.check("known damage does not freeze it again", status.status.is_some_and(|s| !s.enabled), "");
    Ok(())
}

/// Rewrites the reason of `seq`'s stored record, as an attacker with disk access would.
fn tamper(data_dir: &std::path::Path, seq: u64) -> Result<(), String> {
    let store = SledStore::open(data_dir, SledOptions::default(), Arc::default())
        .map_err(|e| e.to_string())?;
    let bytes = store.get(seq).map_err(|e| e.to_string())?.ok_or("no such record")?;
    let text = String::from_utf8(bytes).map_err(|e| e.to_string())?;
    let edited = text.replacen("tampered-log drill", "tampered-log DRILL", 1);
    if edited == text {
        return Err("the record does not hold the drill's reason".into());
    }
    store.append(&[(seq, edited.as_bytes())]).map_err(|e| e.to_string())
}

/// Drill 5: the control plane is killed right after a freeze.
pub(super) async fn killed_during_freeze(t: &mut Target, r: &mut Report) -> Result<(), Stop> {
    let server = t.local.as_ref().ok_or(Stop)?;
    let sibling =
        Sibling::spawn(server.grpc_addr(), server.tokens.service.clone(), STALENESS_BUDGET);
    let thawed = sibling
        .wait_for(|v| matches!(v, View::Live { enabled: false, .. }), Duration::from_secs(10))
        .await;
    r.require(
        "the sibling watches and runs work",
        thawed.is_some(),
        format!("{:?}", sibling.current()),
    )?;

    let reason = format!("{}: freeze, then the control plane dies", r.drill_id);
    let enabled =
        r.need("freeze", t.safe_mode(&t.operator).enable(pb::EnableRequest { reason })).await?;
    let revision = enabled.status.map_or(0, |s| s.revision);
    let server = t.local.as_mut().ok_or(Stop)?;
    server.kill();
    r.check("SIGKILL right after Enable answered", true, format!("revision {revision}"));

    let stale =
        sibling.wait_for(|v| *v == View::Stale, STALENESS_BUDGET + Duration::from_secs(2)).await;
    r.check(
        "the sibling fails closed within its staleness budget",
        stale.is_some() && sibling.current().blocks_work(),
        format!("{:?}", sibling.history()),
    );
    t.restart(r, "the service restarts on the same data").await?;
    let status = r
        .need("read the status", t.safe_mode(&t.operator).get_status(pb::GetStatusRequest {}))
        .await?;
    let status = status.status.unwrap_or_default();
    r.check(
        "still frozen after the restart",
        status.enabled && status.revision == revision,
        format!("enabled {}, revision {}", status.enabled, status.revision),
    );
    let seen = sibling
        .wait_for(|v| *v == View::Live { enabled: true, revision }, Duration::from_secs(10))
        .await;
    r.check(
        "the sibling reconnects and sees the freeze",
        seen.is_some(),
        format!("{:?}", sibling.history()),
    );
    Ok(())
}
