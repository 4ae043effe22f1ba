//! The HTTP API end to end: auth, the volume life cycle, bad input,
//! idempotent create, placement, unreachable units, restart, config.

use local_control_plane::CommandError;
use serde_json::Value;
use zonal_control_plane::{ConfigError, ZonalConfig};

use crate::fake_unit::FakeUnit;
use crate::harness::{one_unit, request, Zonal, ATTACH_TOKEN, GIB, READ_ONLY_TOKEN, TOKEN};

#[tokio::test]
async fn admin_requests_need_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let unit = FakeUnit::start("u1", 11, 100 * GIB).await;
    let zonal = Zonal::start(dir.path(), &[(&unit, 11)]).await;

    for (method, path, body) in [
        ("GET", "/v1/volumes", None),
        ("POST", "/v1/volumes", Some(r#"{"name":"v","size_gib":1}"#)),
        ("GET", "/v1/units", None),
        ("DELETE", "/v1/volumes/v", None),
    ] {
        let missing = request(zonal.address, method, path, None, body).await;
        assert_eq!(missing.status, 401, "{method} {path}");
        assert_eq!(missing.code(), "unauthorized");
        assert!(missing
            .headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"));
        let wrong = request(
            zonal.address,
            method,
            path,
            Some("wrong-token-0000000000"),
            body,
        )
        .await;
        assert_eq!(wrong.status, 401, "{method} {path}");
    }
    // A read-only token reads, and may change nothing (403).
    for (method, path, body, status) in [
        ("GET", "/v1/volumes", None, 200),
        ("GET", "/v1/units", None, 200),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"v","size_gib":1}"#),
            403,
        ),
        ("DELETE", "/v1/volumes/v", None, 403),
        ("POST", "/v1/units/u1/refresh", None, 403),
        // Snapshots: a read-only token lists and describes (here: no
        // such volume), and may neither take nor delete one.
        ("GET", "/v1/volumes/v/snapshots", None, 404),
        ("GET", "/v1/volumes/v/snapshots/s", None, 404),
        (
            "POST",
            "/v1/volumes/v/snapshots",
            Some(r#"{"name":"s"}"#),
            403,
        ),
        ("DELETE", "/v1/volumes/v/snapshots/s", None, 403),
    ] {
        let answer = request(zonal.address, method, path, Some(READ_ONLY_TOKEN), body).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        if status == 403 {
            assert_eq!(answer.code(), "forbidden");
        }
    }
    // Nothing was created by the refused requests.
    assert_eq!(unit.register_calls(), 0);
    zonal.assert_no_volumes().await;

    // Health and metrics need no token.
    let health = zonal.get_without_token("/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let metrics = zonal.get_without_token("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains(
            r#"rackblock_zonal_http_requests_total{route="/v1/volumes",method="GET",status="401"} 2"#
        ),
        "{}",
        metrics.body
    );
    let unknown = zonal.get("/v2/nothing").await;
    unknown.assert_error(404, "not_found");
    let wrong_method = zonal.call("PUT", "/v1/volumes", Some("{}")).await;
    wrong_method.assert_error(405, "method_not_allowed");
    zonal.stop().await;
}

#[tokio::test]
async fn volume_life_cycle_create_list_describe_attach_detach_delete() {
    let (dir, unit, zonal) = one_unit(12).await;

    let created = zonal
        .post(
            "/v1/volumes",
            r#"{"name":"vol0","size_gib":4,"erasure_code":"2+1","partition_size_bytes":1073741824}"#,
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let volume = created.json();
    assert_eq!(volume["id"], 1);
    assert_eq!(volume["unit"], "u1");
    assert_eq!(volume["state"], "available");
    assert_eq!(volume["size_bytes"], 4 * GIB);
    assert_eq!(volume["erasure_code"], "2+1");
    // The unit got RegisterVolume with the zonal id and spec.
    let registered = unit.volumes();
    assert_eq!(registered[&1].name, "vol0");
    assert_eq!(registered[&1].size_bytes, 4 * GIB);

    let list = zonal.get("/v1/volumes").await.json();
    assert_eq!(list["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(list["volumes"][0]["name"], "vol0");

    let described = zonal.get("/v1/volumes/vol0").await;
    assert_eq!(described.status, 200);
    let described = described.json();
    assert_eq!(described["partition_map"]["volume"], 1);
    assert_eq!(
        described["partition_map"]["partitions"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        described["partition_map"]["partitions"][0]["primary"]["address_b"],
        unit.address_b.to_string()
    );
    assert_eq!(described["partition_map_error"], Value::Null);

    let attached = zonal.attach("vol0", "host-a").await;
    assert_eq!(attached.status, 201, "{}", attached.body);
    let attachment = attached.json();
    let token = attachment["token"].as_str().unwrap();
    assert_eq!(token.len(), 32);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(attachment["unit"], "u1");
    assert_eq!(attachment["volume_id"], 1);
    assert_eq!(attachment["size_bytes"], 4 * GIB);
    assert_eq!(
        attachment["head_nodes"][0]["address_a"],
        unit.address_a.to_string()
    );
    assert_eq!(
        attachment["head_nodes"][0]["address_b"],
        unit.address_b.to_string()
    );
    let attachment_id = attachment["attachment_id"].as_u64().unwrap();
    // The unit got the token's digest (never the token) for that id.
    let digest = proto::volume::AttachmentToken::parse_hex(token)
        .unwrap()
        .digest();
    assert_eq!(unit.volumes()[&1].attachments[&attachment_id], digest);
    // A second host gets its own attachment and token.
    let second = zonal.attach("vol0", "host-b").await.json();
    assert_ne!(second["token"], attachment["token"]);

    // Listings never show tokens, and the store keeps only their digests.
    let described = zonal.get("/v1/volumes/vol0").await;
    assert_eq!(described.json()["attachments"].as_array().unwrap().len(), 2);
    assert!(!described.body.contains(token));
    let store = std::fs::read(
        dir.path()
            .join("data")
            .join(zonal_control_plane::daemon::STORE_FILE),
    )
    .unwrap();
    assert!(
        !store.windows(token.len()).any(|w| w == token.as_bytes()),
        "the zonal store holds an attachment token in clear"
    );

    let refused = zonal.delete("/v1/volumes/vol0").await;
    refused.assert_error(409, "volume_attached");

    let detached = zonal.detach("vol0", attachment_id).await;
    assert_eq!(detached.status, 200, "{}", detached.body);
    assert_eq!(detached.json()["attachments"].as_array().unwrap().len(), 1);
    // The unit revoked it.
    assert!(!unit.volumes()[&1].attachments.contains_key(&attachment_id));
    assert_eq!(unit.volumes()[&1].attachments.len(), 1);
    let again = zonal.detach("vol0", attachment_id).await;
    again.assert_error(404, "attachment_not_found");
    let other = second["attachment_id"].as_u64().unwrap();
    let detached = zonal.detach("vol0", other).await;
    assert_eq!(detached.status, 200);

    let deleted = zonal.delete("/v1/volumes/vol0").await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["state"], "deleted");
    // The unit deleted it (not forced: nothing was attached any more).
    assert_eq!(unit.volumes()[&1].deleted, Some(false));
    assert_eq!(zonal.get("/v1/volumes/vol0").await.status, 404);
    assert_eq!(zonal.delete("/v1/volumes/vol0").await.status, 404);
    zonal.assert_no_volumes().await;

    let units = zonal.get("/v1/units").await.json();
    assert_eq!(units["units"][0]["volumes"], 0);
    let metrics = zonal.get_without_token("/metrics").await.body;
    assert!(
        metrics.contains(r#"rackblock_zonal_volumes{state="deleted"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("rackblock_zonal_units_reachable 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"rackblock_zonal_http_requests_total{route="/v1/volumes",method="POST",status="201"} 1"#
        ),
        "{metrics}"
    );
    zonal.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field_and_changes_nothing() {
    let (_dir, unit, zonal) = one_unit(13).await;

    for (body, field) in [
        (r#"{"size_gib":1}"#, "name"),
        (r#"{"name":"v"}"#, "size_bytes"),
        (r#"{"name":"v","size_bytes":0}"#, "size_bytes"),
        (r#"{"name":"v","size_bytes":4097}"#, "size_bytes"),
        (r#"{"name":"v","size_bytes":"big"}"#, "size_bytes"),
        (
            r#"{"name":"v","size_bytes":4096,"size_gib":1}"#,
            "size_bytes",
        ),
        (
            r#"{"name":"v","size_gib":1,"erasure_code":"4+0"}"#,
            "erasure_code",
        ),
        (
            r#"{"name":"v","size_gib":1,"partition_size_bytes":1000}"#,
            "partition_size_bytes",
        ),
        (r#"{"name":"bad name","size_gib":1}"#, "name"),
        (r#"{"name":"v","size_gib":1,"colour":"red"}"#, "colour"),
    ] {
        let response = zonal.post("/v1/volumes", body).await;
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert_eq!(response.code(), "bad_request");
        assert!(
            response.message().starts_with(field),
            "{body}: {} does not name {field}",
            response.message()
        );
    }
    let not_json = zonal.post("/v1/volumes", "{name").await;
    assert_eq!(not_json.status, 400);
    assert_eq!(unit.register_calls(), 0);
    zonal.assert_no_volumes().await;

    zonal.create_volume_created("v", 2).await;
    let shrink = zonal.resize("v", GIB).await;
    assert_eq!(shrink.status, 400);
    assert!(
        shrink.message().starts_with("size_bytes"),
        "{}",
        shrink.body
    );
    let unaligned = zonal.resize("v", 3000000001).await;
    assert_eq!(unaligned.status, 400);
    let same = zonal.resize("v", 2 * GIB).await;
    assert_eq!(same.status, 200);
    assert_eq!(
        zonal.get("/v1/volumes/v").await.json()["size_bytes"],
        2 * GIB
    );

    let attach = zonal.post("/v1/volumes/v/attach", r#"{}"#).await;
    assert_eq!(attach.status, 400);
    assert!(attach.message().starts_with("host"), "{}", attach.body);
    let missing = zonal.attach("nope", "h").await;
    missing.assert_error(404, "volume_not_found");
    let bad_id = zonal.delete("/v1/volumes/v/attachments/x").await;
    assert_eq!(bad_id.status, 404);
    assert_eq!(zonal.get("/v1/units/nope").await.status, 404);
    zonal.stop().await;
}

#[tokio::test]
async fn create_is_idempotent_by_name_and_a_different_spec_conflicts() {
    let (_dir, unit, zonal) = one_unit(14).await;

    let first = zonal.create_volume("v", 1).await;
    assert_eq!(first.status, 201);
    // Same spec, spelled differently (defaults written out).
    let repeat = zonal
        .post(
            "/v1/volumes",
            r#"{"name":"v","size_bytes":1073741824,"erasure_code":"4+2","partition_size_bytes":1073741824}"#,
        )
        .await;
    assert_eq!(repeat.status, 200, "{}", repeat.body);
    assert_eq!(repeat.json()["id"], first.json()["id"]);
    let conflict = zonal.create_volume("v", 2).await;
    conflict.assert_error(409, "name_conflict");
    assert_eq!(unit.register_calls(), 1);

    // A unit's refusal is typed and leaves the name free.
    unit.refuse_next(CommandError::InvalidArgument {
        reason: "the fake says no".into(),
    });
    let refused = zonal.create_volume("w", 1).await;
    refused.assert_error(400, "invalid_argument");
    assert!(refused.message().contains("the fake says no"));
    let retried = zonal.create_volume_created("w", 1).await;
    // Ids are never reused: the refused attempt consumed id 2.
    assert_eq!(retried["id"], 3);
    zonal.stop().await;
}

#[tokio::test]
async fn placement_picks_the_unit_with_more_free_space_then_fewer_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let small = FakeUnit::start("small", 15, 10 * GIB).await;
    let big = FakeUnit::start("big", 16, 100 * GIB).await;
    let zonal = Zonal::start(dir.path(), &[(&small, 15), (&big, 16)]).await;
    zonal.wait_units(&["big", "small"]).await;

    let a = zonal.create_volume_created("a", 1).await;
    assert_eq!(a["unit"], "big");
    // 12 GiB at 4+2 needs 18 GiB raw: only `big` fits.
    small.set_free_bytes(200 * GIB);
    big.set_free_bytes(20 * GIB);
    zonal.refresh_unit("small").await;
    let refreshed = zonal.refresh_unit("big").await.json();
    assert_eq!(refreshed["capacity"]["allocatable_bytes"], 20 * GIB);
    let b = zonal.create_volume_created("b", 12).await;
    assert_eq!(b["unit"], "small");
    // Too big for every unit: 503 naming each unit's shortfall.
    let huge = zonal.create_volume("c", 1000).await;
    huge.assert_error(503, "no_unit_fits");
    assert!(
        huge.message().contains("big:") && huge.message().contains("small:"),
        "{}",
        huge.body
    );

    // Equal free space: the unit with fewer volumes wins.
    small.set_free_bytes(50 * GIB);
    big.set_free_bytes(50 * GIB);
    big.state.lock().unwrap().volumes.clear();
    zonal.refresh_unit("small").await;
    zonal.refresh_unit("big").await;
    let units = zonal.get("/v1/units").await.json();
    assert_eq!(units["units"][0]["name"], "big");
    assert_eq!(units["units"][0]["volumes"], 1);
    assert_eq!(units["units"][1]["volumes"], 1);
    let d = zonal.create_volume_created("d", 1).await;
    // Tie on volumes too (1 each): the name decides.
    assert_eq!(d["unit"], "big");
    let e = zonal.create_volume_created("e", 1).await;
    assert_eq!(e["unit"], "small");
    zonal.stop().await;
}

#[tokio::test]
async fn an_unreachable_unit_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let never = FakeUnit::dead("never", 17).await;
    let roomy = FakeUnit::start("roomy", 18, 500 * GIB).await;
    let modest = FakeUnit::start("modest", 19, 50 * GIB).await;
    let zonal = Zonal::start(dir.path(), &[(&never, 17), (&roomy, 18), (&modest, 19)]).await;
    let units = zonal.wait_units(&["modest", "roomy"]).await;
    let never_view = &units["units"][1];
    assert_eq!(never_view["name"], "never");
    assert_eq!(never_view["reachable"], false);
    assert_eq!(never_view["health"], "unreachable");
    assert!(never_view["last_error"]
        .as_str()
        .unwrap()
        .contains("no head node answered"));
    assert_eq!(units["units"][2]["health"], "ok");
    assert_eq!(units["units"][2]["leader"], "roomy-hn-1");

    // The roomiest unit goes away: it is kept, marked unreachable with its
    // last capacity, and placement moves on.
    roomy.stop();
    let refreshed = zonal.refresh_unit("roomy").await.json();
    assert_eq!(refreshed["reachable"], false);
    assert_eq!(refreshed["capacity"]["allocatable_bytes"], 500 * GIB);
    let v = zonal.create_volume_created("v", 1).await;
    assert_eq!(v["unit"], "modest");
    let health = zonal.get_without_token("/health").await.json();
    assert_eq!(health["units"], 3);
    assert_eq!(health["units_reachable"], 1);

    // With no reachable unit left, create is a 503 and nothing is stored.
    modest.stop();
    zonal.refresh_unit("modest").await;
    let w = zonal.create_volume("w", 1).await;
    assert_eq!(w.status, 503);
    assert!(w.message().contains("unreachable"), "{}", w.body);
    assert_eq!(zonal.get("/v1/volumes/w").await.status, 404);
    // Describe still answers from the store when the unit is gone.
    let described = zonal.get("/v1/volumes/v").await.json();
    assert_eq!(described["partition_map"], Value::Null);
    assert!(described["partition_map_error"]
        .as_str()
        .unwrap()
        .contains("modest"));
    zonal.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart_on_the_same_data_dir() {
    let (dir, unit, zonal) = one_unit(20).await;
    zonal.create_volume_created("kept", 1).await;
    let attached = zonal.attach("kept", "h1").await.json();
    zonal.create_volume_created("gone", 1).await;
    assert_eq!(zonal.delete("/v1/volumes/gone").await.status, 200);
    zonal.stop().await;

    let zonal = Zonal::start(dir.path(), &[(&unit, 20)]).await;
    let volumes = zonal.get("/v1/volumes").await.json();
    let volumes = volumes["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0]["name"], "kept");
    assert_eq!(volumes[0]["state"], "available");
    assert_eq!(
        volumes[0]["attachments"][0]["id"],
        attached["attachment_id"]
    );
    assert_eq!(volumes[0]["attachments"][0]["host"], "h1");
    // The unit report was stored too (visible before any new poll may land).
    let units = zonal.get("/v1/units").await.json();
    assert!(!units["units"][0]["reported_at_ms"].is_null());
    // Ids continue after the last one handed out.
    let next = zonal.create_volume_created("new", 1).await;
    assert_eq!(next["id"], 3);
    zonal.stop().await;
}

#[tokio::test]
async fn config_refuses_unknown_fields_and_the_daemon_refuses_a_broken_rack_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zonal.toml");
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token = \"{TOKEN}\"\nlisten_port = 9\n", dir.path().display()),
    )
    .unwrap();
    let error = ZonalConfig::load(&path).unwrap_err();
    assert!(
        matches!(
            error,
            ConfigError::File(hardware::config::ConfigError::Parse { .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("listen_port"), "{error}");

    let rack = dir.path().join("broken.rack.toml");
    std::fs::write(&rack, "[unit]\nname = \"x\"\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token = \"{TOKEN}\"\n[[units]]\nname = \"x\"\nrack_file = \"{}\"\n",
            dir.path().join("data").display(),
            rack.display()
        ),
    )
    .unwrap();
    let config = ZonalConfig::load(&path).unwrap();
    let error = zonal_control_plane::run(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("broken.rack.toml"), "{error}");
}

#[tokio::test]
async fn a_create_with_unknown_outcome_stays_creating_and_a_repeat_settles_it() {
    let (_dir, unit, zonal) = one_unit(21).await;

    // The unit applies RegisterVolume and dies before answering.
    unit.state.lock().unwrap().crash_after_apply = true;
    let lost = zonal.create_volume("v", 1).await;
    lost.assert_error(503, "outcome_unknown");
    assert_eq!(unit.volumes().len(), 1);
    let described = zonal.get("/v1/volumes/v").await.json();
    assert_eq!(described["state"], "creating");
    assert_eq!(described["unit"], "u1");
    let attach = zonal.attach("v", "h").await;
    attach.assert_error(409, "volume_not_available");
    let different = zonal.create_volume("v", 2).await;
    assert_eq!(different.status, 409);

    // The unit comes back; the same create finds it applied (same id).
    unit.restart().await;
    let settled = zonal.create_volume_created("v", 1).await;
    assert_eq!(settled["state"], "available");
    assert_eq!(settled["id"], described["id"]);
    assert_eq!(unit.volumes().len(), 1);
    assert_eq!(unit.register_calls(), 2);
    assert_eq!(zonal.attach("v", "h").await.status, 201);
    zonal.stop().await;
}

#[tokio::test]
async fn resize_is_forwarded_and_recorded_only_once_the_unit_applied_it() {
    let (_dir, unit, zonal) = one_unit(17).await;
    zonal.create_volume_created("v", 2).await;
    // The unit refuses: the record is unchanged.
    unit.refuse_next(CommandError::NotEnoughNodes {
        needed: 2,
        available: 1,
    });
    let refused = zonal.resize("v", 4 * GIB).await;
    refused.assert_error(503, "not_enough_nodes");
    assert_eq!(
        zonal.get("/v1/volumes/v").await.json()["size_bytes"],
        2 * GIB
    );
    assert_eq!(unit.volumes()[&1].size_bytes, 2 * GIB);
    // POST and PUT both grow it; the unit and the record agree.
    let grown = zonal
        .call(
            "PUT",
            "/v1/volumes/v/resize",
            Some(r#"{"size_bytes":4294967296}"#),
        )
        .await;
    assert_eq!(grown.status, 200, "{}", grown.body);
    assert_eq!(grown.json()["size_bytes"], 4 * GIB);
    assert_eq!(unit.volumes()[&1].size_bytes, 4 * GIB);
    let grown = zonal.resize("v", 4 * GIB + 4096).await;
    assert_eq!(grown.status, 200, "{}", grown.body);
    assert_eq!(unit.volumes()[&1].size_bytes, 4 * GIB + 4096);
    let described = zonal.get("/v1/volumes/v").await.json();
    assert_eq!(described["size_bytes"], 4 * GIB + 4096);
    assert_eq!(described["partition_map"]["size_bytes"], 4 * GIB + 4096);
    // An unreachable unit: 503, unchanged.
    unit.stop();
    let unreachable = zonal.resize("v", 8 * GIB).await;
    assert_eq!(unreachable.status, 503, "{}", unreachable.body);
    assert_eq!(
        zonal.get("/v1/volumes").await.json()["volumes"][0]["size_bytes"],
        4 * GIB + 4096
    );
    zonal.stop().await;
}

#[tokio::test]
async fn delete_forwards_force_and_attach_fails_cleanly_when_the_unit_refuses() {
    let (_dir, unit, zonal) = one_unit(18).await;
    zonal.create_volume_created("v", 1).await;
    // The unit refuses the attachment: no attachment is left anywhere.
    unit.refuse_next(CommandError::VolumeDeleting { volume: 1 });
    let refused = zonal.attach("v", "h").await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        zonal.get("/v1/volumes/v").await.json()["attachments"],
        Value::Array(vec![])
    );
    assert!(unit.volumes()[&1].attachments.is_empty());

    let attached = zonal.attach("v", "h").await;
    assert_eq!(attached.status, 201, "{}", attached.body);
    let refused = zonal.delete("/v1/volumes/v").await;
    refused.assert_error(409, "volume_attached");
    assert_eq!(unit.volumes()[&1].deleted, None, "nothing was sent");
    let bad = zonal.delete("/v1/volumes/v?force=maybe").await;
    assert_eq!(bad.status, 400);
    // An unreachable unit leaves the volume deleting; a repeat settles it.
    unit.stop();
    let unreachable = zonal.delete("/v1/volumes/v?force=true").await;
    assert_eq!(unreachable.status, 503, "{}", unreachable.body);
    assert_eq!(zonal.get("/v1/volumes/v").await.json()["state"], "deleting");
    unit.restart().await;
    let deleted = zonal.delete("/v1/volumes/v?force=true").await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["state"], "deleted");
    assert_eq!(unit.volumes()[&1].deleted, Some(true));
    assert!(unit.volumes()[&1].attachments.is_empty());
    // The name is free again, on the same unit (polled again: the failed
    // delete marked it unreachable).
    assert_eq!(zonal.refresh_unit("u1").await.status, 200);
    let again = zonal.create_volume_created("v", 1).await;
    assert_eq!(again["unit"], "u1");
    zonal.stop().await;
}

/// QoS limits: given at create they reach the unit's record (and the
/// partition map describe shows); PATCH changes fields, removes one set to
/// null, keeps the others, and `qos: null` removes all; bad limits are a
/// 400 naming the field and never reach the unit; a unit that refuses or
/// cannot be reached leaves the record as it was.
#[tokio::test]
async fn qos_limits_at_create_and_modify_reach_the_unit() {
    let (_dir, unit, zonal) = one_unit(22).await;
    let created = zonal
        .post(
            "/v1/volumes",
            r#"{"name":"q","size_gib":1,"qos":{"iops":1000,"bandwidth_bytes_per_second":52428800,"burst_iops":3000,"burst_length_ms":10000}}"#,
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["qos"]["iops"], 1000);
    let on_unit = unit.volumes()[&1].qos.unwrap();
    assert_eq!(on_unit.iops, Some(1000));
    assert_eq!(on_unit.burst_iops, Some(3000));
    assert_eq!(on_unit.burst_length_ms, Some(10_000));
    assert_eq!(on_unit.bandwidth_bytes_per_second, Some(50 << 20));
    let described = zonal.get("/v1/volumes/q").await.json();
    assert_eq!(described["partition_map"]["qos"]["burst_iops"], 3000);

    for (body, field) in [
        (r#"{"qos":{"iops":0}}"#, "qos.iops"),
        (r#"{"qos":{"burst_iops":10}}"#, "qos.burst_iops"),
        (r#"{"qos":{"iops":"fast"}}"#, "qos.iops"),
        (r#"{"qos":{"colour":1}}"#, "qos.colour"),
        (r#"{"qos":7}"#, "qos"),
        (r#"{}"#, "qos"),
    ] {
        let response = zonal.call("PATCH", "/v1/volumes/q", Some(body)).await;
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert!(
            response.message().starts_with(field),
            "{body}: {} does not name {field}",
            response.message()
        );
    }
    let bad_create = zonal
        .post(
            "/v1/volumes",
            r#"{"name":"r","size_gib":1,"qos":{"iops":100,"burst_iops":50}}"#,
        )
        .await;
    assert_eq!(bad_create.status, 400, "{}", bad_create.body);
    assert_eq!(unit.volumes().len(), 1);
    assert_eq!(unit.volumes()[&1].qos, Some(on_unit));

    // One field changed, one removed (with its burst), the rest kept.
    let modified = zonal
        .call(
            "PATCH",
            "/v1/volumes/q",
            Some(r#"{"qos":{"iops":2000,"bandwidth_bytes_per_second":null}}"#),
        )
        .await;
    assert_eq!(modified.status, 200, "{}", modified.body);
    let on_unit = unit.volumes()[&1].qos.unwrap();
    assert_eq!(on_unit.iops, Some(2000));
    assert_eq!(on_unit.burst_iops, Some(3000));
    assert_eq!(on_unit.bandwidth_bytes_per_second, None);
    assert_eq!(modified.json()["qos"]["iops"], 2000);

    // A refusing unit: the record keeps its limits.
    unit.refuse_next(CommandError::InvalidArgument {
        reason: "no".into(),
    });
    let refused = zonal
        .call("PATCH", "/v1/volumes/q", Some(r#"{"qos":{"iops":5}}"#))
        .await;
    refused.assert_error(400, "invalid_argument");
    assert_eq!(zonal.get("/v1/volumes/q").await.json()["qos"]["iops"], 2000);

    let cleared = zonal
        .call("PATCH", "/v1/volumes/q", Some(r#"{"qos":null}"#))
        .await;
    assert_eq!(cleared.status, 200, "{}", cleared.body);
    assert!(cleared.json()["qos"].is_null(), "{}", cleared.body);
    assert_eq!(unit.volumes()[&1].qos, None);
    let missing = zonal
        .call("PATCH", "/v1/volumes/nope", Some(r#"{"qos":null}"#))
        .await;
    missing.assert_error(404, "volume_not_found");
    zonal.stop().await;
}

/// A host's attach-scoped token attaches and detaches the volumes its entry
/// lists, for its own host, and does nothing else: no other volume, no
/// other host's attachment, no create, delete, resize, listing or unit
/// call (403, nothing sent to the unit).
#[tokio::test]
async fn an_attach_scoped_token_attaches_only_its_volumes_for_its_host() {
    let (_dir, unit, zonal) = one_unit(14).await;
    for name in ["vol0", "vol1", "other"] {
        zonal.create_volume_created(name, 1).await;
    }
    let as_host = |method: &'static str, path: String, body: Option<&'static str>| {
        let address = zonal.address;
        async move { request(address, method, &path, Some(ATTACH_TOKEN), body).await }
    };
    let attached = as_host(
        "POST",
        "/v1/volumes/vol0/attach".into(),
        Some(r#"{"host":"host-a"}"#),
    )
    .await;
    assert_eq!(attached.status, 201, "{}", attached.body);
    let own = attached.json()["attachment_id"].as_u64().unwrap();
    assert!(attached.json()["token"].as_str().is_some());
    // A listed name is matched as the route decodes it.
    let spaced = as_host(
        "POST",
        "/v1/volumes/vol%31/attach".into(),
        Some(r#"{"host":"host-a"}"#),
    )
    .await;
    assert_eq!(spaced.status, 201, "{}", spaced.body);

    let other_host = zonal.attach("vol0", "host-b").await.json();
    let theirs = other_host["attachment_id"].as_u64().unwrap();
    for (method, path, body) in [
        (
            "POST",
            "/v1/volumes/other/attach".to_owned(),
            Some(r#"{"host":"host-a"}"#),
        ),
        // Its own volume, another host's name.
        (
            "POST",
            "/v1/volumes/vol0/attach".to_owned(),
            Some(r#"{"host":"host-b"}"#),
        ),
        // Another host's attachment of its own volume.
        (
            "DELETE",
            format!("/v1/volumes/vol0/attachments/{theirs}"),
            None,
        ),
        ("GET", "/v1/volumes".to_owned(), None),
        ("GET", "/v1/volumes/vol0".to_owned(), None),
        ("GET", "/v1/units".to_owned(), None),
        (
            "POST",
            "/v1/volumes".to_owned(),
            Some(r#"{"name":"v","size_gib":1}"#),
        ),
        ("DELETE", "/v1/volumes/vol0?force=true".to_owned(), None),
        (
            "POST",
            "/v1/volumes/vol0/resize".to_owned(),
            Some(r#"{"size_bytes":4294967296}"#),
        ),
        (
            "POST",
            "/v1/volumes/vol0/snapshots".to_owned(),
            Some(r#"{"name":"s"}"#),
        ),
        ("POST", "/v1/units/u1/refresh".to_owned(), None),
    ] {
        let answer = as_host(method, path.clone(), body).await;
        assert_eq!(answer.status, 403, "{method} {path}: {}", answer.body);
        assert_eq!(answer.code(), "forbidden");
    }
    // The refused attaches registered nothing with the unit (the admin's
    // one did).
    assert_eq!(unit.volumes()[&1].attachments.len(), 2);
    assert_eq!(unit.volumes()[&2].attachments.len(), 1);
    assert!(unit.volumes()[&3].attachments.is_empty());

    let detached = as_host(
        "DELETE",
        format!("/v1/volumes/vol0/attachments/{own}"),
        None,
    )
    .await;
    assert_eq!(detached.status, 200, "{}", detached.body);
    assert!(!unit.volumes()[&1].attachments.contains_key(&own));
    assert!(unit.volumes()[&1].attachments.contains_key(&theirs));
    zonal.stop().await;
}
