//! The two ways to build the images make the same images: the runtime
//! stages of deploy/docker/Dockerfile (built where images can be pulled)
//! and of deploy/docker/Dockerfile.scratch (deploy/docker/build.sh, no
//! registry) copy the same files with the same owners, and set the same
//! user, environment and labels. Only where the files come from differs:
//! the build stage's /image/ in one, the build context in the other.

use std::collections::BTreeMap;

const DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/docker");

/// The instructions of each `FROM scratch AS name` stage, continuation
/// lines joined, comments and blank lines dropped.
fn runtime_stages(dockerfile: &str) -> BTreeMap<String, Vec<String>> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            current.push_str(start.trim_end());
            current.push(' ');
            continue;
        }
        current.push_str(line);
        instructions.push(std::mem::take(&mut current));
    }
    let mut stages = BTreeMap::new();
    let mut stage: Option<String> = None;
    for instruction in instructions {
        if let Some(rest) = instruction.strip_prefix("FROM ") {
            stage = rest
                .strip_prefix("scratch AS ")
                .map(|name| name.trim().to_owned());
            if let Some(name) = &stage {
                stages.insert(name.clone(), Vec::new());
            }
            continue;
        }
        if let Some(name) = &stage {
            stages
                .get_mut(name)
                .expect("the stage was inserted")
                .push(instruction);
        }
    }
    stages
}

#[test]
fn both_dockerfiles_make_the_same_runtime_images() {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{DOCKER}/{name}"))
            .unwrap_or_else(|e| panic!("{DOCKER}/{name}: {e}"))
    };
    let with_registry = runtime_stages(&read("Dockerfile"));
    let without = runtime_stages(&read("Dockerfile.scratch"));
    assert_eq!(
        with_registry.keys().collect::<Vec<_>>(),
        ["bench", "control-plane", "proxy"],
        "one image per binary"
    );
    let from_build_stage: BTreeMap<String, Vec<String>> = with_registry
        .into_iter()
        .map(|(name, instructions)| {
            let instructions = instructions
                .into_iter()
                .map(|i| i.replace("--from=build ", "").replace(" /image/", " "))
                .collect();
            (name, instructions)
        })
        .collect();
    assert_eq!(from_build_stage, without);
    for (name, instructions) in &without {
        assert!(
            instructions.iter().any(|i| i == "USER 1337:1337"),
            "{name} runs as the proxy's uid, never root"
        );
    }
}
