//! `slotforge merge-reports`: the `--json` reports of `slotforge test --shard K/N` runs merged
//! into the report of the whole matrix (table, JSON, JUnit), exit status as for `test`.

mod common;
use common::*;

fn step(path: &str, order: usize, index: usize, result: &str) -> serde_json::Value {
    serde_json::json!({"path": path, "order": order, "index": index, "label": if index == 0 { "install".to_string() } else { format!("upgrade v{index}") },
        "result": result, "seconds": 20.0, "boots": 1, "expect": {}, "observed": null, "message": if result == "fail" { "expected slot = \"b\"" } else { "" }, "serial": null})
}

fn shard_report(dir: &std::path::Path, name: &str, shard: &str, steps: Vec<serde_json::Value>) -> std::path::PathBuf {
    let count = |k: &str| steps.iter().filter(|s| s["result"] == k).count();
    let r = serde_json::json!({"matrix": "upgrades.yaml", "accel": "tcg", "jobs": 1, "seconds": 60.0, "passed": count("pass"), "failed": count("fail"), "skipped": count("skipped"), "shard": shard, "steps": steps});
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(&r).unwrap()).unwrap();
    p
}

#[test]
fn shard_reports_merge_into_the_whole_run() {
    let d = tempfile::tempdir().unwrap();
    // Shard 2 ran paths 0 and 2, shard 1 path 1 — each in its own order.
    let a = shard_report(d.path(), "a.json", "1/2", vec![step("upgrade", 1, 1, "pass"), step("upgrade", 1, 0, "pass")]);
    let b = shard_report(d.path(), "b.json", "2/2", vec![step("plain", 0, 0, "pass"), step("crash", 2, 0, "pass"), step("crash", 2, 1, "fail")]);
    let junit = d.path().join("all.xml");
    let o = slotforge(&["merge-reports", a.to_str().unwrap(), b.to_str().unwrap(), "--json", "--junit", junit.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "a failed step fails the merged run: {}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let order: Vec<(String, u64)> = m["steps"].as_array().unwrap().iter().map(|s| (s["path"].as_str().unwrap().to_string(), s["index"].as_u64().unwrap())).collect();
    assert_eq!(order, [("plain".into(), 0), ("upgrade".into(), 0), ("upgrade".into(), 1), ("crash".into(), 0), ("crash".into(), 1)], "matrix order");
    assert_eq!((m["passed"].as_u64(), m["failed"].as_u64(), m["jobs"].as_u64()), (Some(4), Some(1), Some(2)));
    assert!(m.get("shard").is_none(), "{m}");
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(x.contains("name=\"crash\" tests=\"2\" failures=\"1\"") && x.contains("name=\"plain\""), "{x}");
    // All passed: exit 0. The same step in two reports: refused.
    let c = shard_report(d.path(), "c.json", "2/2", vec![step("plain", 0, 0, "pass")]);
    ok(&slotforge(&["merge-reports", a.to_str().unwrap(), c.to_str().unwrap()]));
    let o = slotforge(&["merge-reports", c.to_str().unwrap(), c.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("shards overlap"));
}
