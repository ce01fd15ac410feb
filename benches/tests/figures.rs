//! `benches/figures.py`, which every bench script uses to write its
//! figures: a document with each kind of chart is saved as JSON and drawn
//! as one PNG per chart, and a loadgen report's per-second counts and
//! latency CDF become chart data. Needs the project's Python with
//! matplotlib (`deploy/local/test` installs it in `.local/venv`).

use std::process::Command;

const SCRIPT: &str = r#"
import json, os, sys
sys.path.insert(0, sys.argv[1])
import figures
out = sys.argv[2]
outcome = {"delivered_rate": 10.0, "per_second": [{"t": 1, "sent": 9, "acked": 8, "received": 7}],
           "latency_cdf_us": [[0.5, 1500.0], [0.99, 9000.0], [1.0, 12000.0]]}
series, cdf = figures.loadgen_lines(outcome)
assert series == [[1, 7]], series
assert cdf == [[0.5, 1.5], [0.99, 9.0], [1.0, 12.0]], cdf
f = figures.Figures("selftest", "every kind of chart", {"devices": 3})
f.bars("bars", "msg/s", {"a": 1200.0, "b": 800.5, "left out": None})
f.series("series", "msg/s", {"a": series, "empty": []})
f.cdf("cdf", "ms", {"a": cdf})
f.series("nothing to draw", "msg/s", {})
drawn = f.save(out)
print(json.dumps({"drawn": [os.path.basename(p) for p in drawn],
                  "doc": json.load(open(os.path.join(out, "figures.json")))}))
"#;

#[test]
fn figures_are_saved_as_json_and_drawn_as_png() {
    let root = fluxmesh_testkit::workspace_root();
    let python = std::env::var_os("FM_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join(".local/venv/bin/python"));
    let dir = tempfile_dir();
    let out = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(root.join("benches"))
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run deploy/local/test, which installs it)", python.display()));
    assert!(out.status.success(), "figures.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let kinds: Vec<&str> =
        seen["doc"]["charts"].as_array().expect("charts").iter().filter_map(|c| c["kind"].as_str()).collect();
    assert_eq!(kinds, ["bars", "series", "cdf"], "a chart with no data is left out: {seen}");
    assert_eq!(seen["doc"]["charts"][0]["data"], serde_json::json!({"a": 1200.0, "b": 800.5}), "{seen}");
    assert_eq!(seen["doc"]["params"]["devices"], 3);
    let drawn: Vec<&str> = seen["drawn"].as_array().expect("drawn").iter().filter_map(|p| p.as_str()).collect();
    assert_eq!(drawn, ["selftest-1-bars.png", "selftest-2-series.png", "selftest-3-cdf.png"]);
    for name in drawn {
        let png = std::fs::read(dir.join(name)).expect("chart file");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{name} is a drawn PNG");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fluxmesh-figures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
