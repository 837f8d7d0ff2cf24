//! Static checks of what cannot run here: the container build and compose
//! file (no Docker engine on this machine), the README's promises and the
//! configuration reference. Each fails when a file names a binary, a
//! variable or a command that does not exist. And the README and docs/
//! speak of the product, not of how it was developed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repo")
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Every binary the workspace builds, from `cargo metadata`.
fn workspace_binaries() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Json = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

fn compose() -> Yaml {
    let mut doc: Yaml = serde_yaml::from_str(&read("deploy/compose.yaml")).expect("compose.yaml parses");
    doc.apply_merge().expect("merge keys resolve");
    doc
}

/// A compose service's `command`, as its words.
fn command_of(service: &str) -> Vec<String> {
    compose()["services"][service]["command"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{service} command"))
        .iter()
        .filter_map(Yaml::as_str)
        .map(str::to_owned)
        .collect()
}

fn herald_variables() -> BTreeSet<&'static str> {
    herald_config::VARIABLES.iter().map(|v| v.name).collect()
}

#[test]
fn the_compose_file_runs_only_binaries_the_workspace_builds_with_known_variables() {
    let bins = workspace_binaries();
    for expected in [
        "herald",
        "herald-api",
        "herald-email-worker",
        "herald-push-worker",
        "herald-inapp-worker",
        "heraldctl",
    ] {
        assert!(
            bins.contains(expected),
            "workspace lost the `{expected}` binary: {bins:?}"
        );
    }
    let doc = compose();
    let services = doc["services"].as_mapping().expect("services");
    let known = herald_variables();
    let mut herald_services = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap_or_default();
        let Some(cmd) = svc["command"]
            .as_sequence()
            .and_then(|c| c.first())
            .and_then(Yaml::as_str)
        else {
            continue;
        };
        if svc["image"].as_str().is_some_and(|i| i.starts_with("herald")) {
            herald_services += 1;
            assert!(
                bins.contains(cmd),
                "service `{name}` runs `{cmd}`, which the workspace does not build"
            );
            let env = svc["environment"]
                .as_mapping()
                .expect("herald services set their environment");
            let mut map = std::collections::HashMap::new();
            for (k, v) in env {
                let k = k.as_str().unwrap_or_default();
                assert!(
                    known.contains(k),
                    "service `{name}` sets `{k}`, which Herald does not read"
                );
                map.insert(k.to_owned(), v.as_str().unwrap_or_default().to_owned());
            }
            // The values must pass Herald's own start-up validation.
            if let Err(e) = herald_config::Settings::from_map(&map) {
                panic!("service `{name}` would not start: {e}");
            }
        }
    }
    assert_eq!(herald_services, 5, "migrate, api and three workers");
    for w in [
        "api",
        "email-worker",
        "push-worker",
        "inapp-worker",
        "migrate",
        "postgres",
        "redis",
    ] {
        assert!(services.contains_key(w), "compose lost the `{w}` service");
    }
}

#[test]
fn compose_runs_redis_with_aof_and_noeviction() {
    let joined = command_of("redis").join(" ");
    assert!(joined.contains("--appendonly yes"), "{joined}");
    assert!(joined.contains("--maxmemory-policy noeviction"), "{joined}");
}

#[test]
fn compose_gives_postgres_room_for_wal_between_checkpoints() {
    let cmd = command_of("postgres");
    assert_eq!(cmd.first().map(String::as_str), Some("postgres"), "{cmd:?}");
    assert!(cmd.windows(2).any(|w| w == ["-c", "max_wal_size=4GB"]), "{cmd:?}");
}

#[test]
fn the_container_image_holds_every_binary_compose_runs() {
    let dockerfile = read("deploy/Dockerfile");
    let bins = workspace_binaries();
    let copied: BTreeSet<String> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|src| src.rsplit('/').next())
        .map(str::to_owned)
        .collect();
    for b in &copied {
        assert!(
            bins.contains(b),
            "the Dockerfile copies `{b}`, which the workspace does not build"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{b}")),
            "`{b}` is copied but never built"
        );
    }
    let doc = compose();
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        if svc["image"].as_str().is_some_and(|i| i.starts_with("herald")) {
            let cmd = svc["command"][0].as_str().unwrap_or_default();
            assert!(
                copied.contains(cmd),
                "service {:?} runs `{cmd}`, which the image lacks",
                name.as_str()
            );
        }
    }
    for line in dockerfile.lines().filter(|l| l.starts_with("ENV ")) {
        for pair in line[4..].split_whitespace() {
            let var = pair.split('=').next().unwrap_or_default();
            assert!(
                herald_variables().contains(var),
                "the Dockerfile sets `{var}`, which Herald does not read"
            );
        }
    }
}

/// The commands in the README's quick start code block.
fn quick_start_commands() -> Vec<String> {
    let readme = read("README.md");
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("README has a Quick start section");
    let block = section.split("```").nth(1).expect("Quick start has a code block");
    block
        .lines()
        .skip(1) // the language tag line
        .map(|l| l.split(" #").next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_quick_start_is_two_commands_and_ci_runs_the_test_one() {
    let commands = quick_start_commands();
    assert_eq!(
        commands.len(),
        2,
        "the quick start must be exactly run + test: {commands:?}"
    );
    let ci = read(".ci/run");
    assert!(
        ci.lines()
            .any(|l| l.trim() == commands[1] || l.trim().starts_with(&format!("{} 2>&1 |", commands[1]))),
        "`.ci/run` must call the README's test command `{}` exactly",
        commands[1]
    );
    assert!(
        commands[0].contains("-p herald"),
        "the run command starts the all-in-one binary: {}",
        commands[0]
    );
}

/// The names in the first column of the configuration reference's
/// `| variable | default | meaning |` table, backticks removed.
fn configuration_table_names() -> Vec<String> {
    let doc = read("docs/configuration.md");
    let mut lines = doc
        .lines()
        .skip_while(|l| l.trim() != "| variable | default | meaning |");
    assert!(
        lines.next().is_some(),
        "docs/configuration.md has no `| variable | default | meaning |` table"
    );
    lines
        .skip(1) // the |---|---|---| line
        .take_while(|l| l.trim_start().starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .map(|cell| cell.trim().trim_matches('`').to_owned())
        .collect()
}

#[test]
fn every_setting_is_documented_in_the_configuration_reference() {
    let names = configuration_table_names();
    assert!(!names.is_empty(), "docs/configuration.md's table has no rows");
    for v in herald_config::VARIABLES {
        assert!(
            names.iter().any(|n| n == v.name),
            "docs/configuration.md's table does not document `{}`",
            v.name
        );
    }
    let known = herald_variables();
    for name in &names {
        if name.starts_with("HERALD_") || name == "DATABASE_URL" || name == "REDIS_URL" {
            assert!(
                known.contains(name.as_str()),
                "docs/configuration.md documents `{name}`, which Herald does not read \
                 (not in herald_config::VARIABLES)"
            );
        }
    }
}

/// Words that look like a git commit hash: a standalone run of 7 to 40
/// lowercase hexadecimal characters with at least one digit and at least
/// one letter from a to f.
fn hash_like_words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| (7..=40).contains(&w.len()))
        .filter(|w| w.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
        .filter(|w| w.chars().any(|c| c.is_ascii_digit()) && w.chars().any(|c| c.is_ascii_lowercase()))
        .collect()
}

/// Every line of `text` (the file `file`) that speaks of how Herald was
/// developed rather than what it is: commit hashes, issue numbers, the
/// design notes, working sessions. One message per finding, naming the
/// file, the line and the offending token.
fn development_history(file: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        for w in hash_like_words(line) {
            found.push(format!("{file}:{n}: `{w}` looks like a commit hash: {line}"));
        }
        let lower = line.to_lowercase();
        let issue_number = lower
            .match_indices("issue #")
            .any(|(at, m)| lower[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
        if issue_number {
            found.push(format!("{file}:{n}: `issue #` with a number: {line}"));
        }
        if line.contains("DESIGN") {
            found.push(format!("{file}:{n}: `DESIGN`: {line}"));
        }
        if lower.contains("session") {
            found.push(format!("{file}:{n}: `session`: {line}"));
        }
    }
    found
}

#[test]
fn the_readme_is_for_users_short_and_free_of_development_history() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= 350,
        "README.md has {lines} lines, more than 350: move the detail to docs/"
    );
    let found = development_history("README.md", &readme);
    assert!(
        found.is_empty(),
        "README.md speaks of development history:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_docs_speak_of_the_product_only() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("reading docs/")
        .map(|entry| entry.expect("an entry of docs/").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            format!("docs/{name}")
        })
        .collect();
    assert!(!files.is_empty(), "docs/ has no files");
    files.sort();
    files.push("ARCHITECTURE.md".to_owned());
    let found: Vec<String> = files
        .iter()
        .flat_map(|file| development_history(file, &read(file)))
        .collect();
    assert!(
        found.is_empty(),
        "the docs speak of development history:\n{}",
        found.join("\n")
    );
}
