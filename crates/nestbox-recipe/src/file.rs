//! Recipe files (TOML).
//!
//! ```toml
//! name = "web"            # template name (the CLI's --name wins)
//! base = "python"         # a template: ours or the team's (default `minimal`)
//! # image = "ghcr.io/acme/app:1"   # or an OCI image from a registry, instead of `base`
//! kind = "snapshot"       # or "image"
//! memory_mb = 512
//! timeout_sec = 900
//!
//! [[step]]
//! run = "echo hi > /etc/motd"     # with optional user = "…", cwd = "…"
//! [[step]]
//! copy = "app"                    # a file or directory beside this file
//! to = "/srv/app"                 # the directory it lands in; optional user = owner
//! [[step]]
//! env = { PORT = "8080" }
//! [[step]]
//! workdir = "/srv/app"
//! [[step]]
//! user = "user"
//! [[step]]
//! apt = ["curl"]                  # also pip = […], npm = […]
//!
//! [start]
//! command = "python3 -m http.server 8080"
//! ready = "curl -sf localhost:8080"
//! ```
//!
//! A step is a table with exactly one of `run`, `copy`, `env`, `workdir`, `apt`, `pip`,
//! `npm` — or `user` alone, which sets the user of the steps after it.

use std::collections::BTreeMap;
use std::path::Path;

use nestbox_types::TemplateKind;
use nestbox_types::api::{BuildStep, Recipe, StartCommand};
use serde::Deserialize;

use crate::{Prepared, RecipeError, archive, finish, inside};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: Option<String>,
    base: Option<String>,
    image: Option<String>,
    kind: Option<TemplateKind>,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    disk_size_mb: Option<u32>,
    timeout_sec: Option<u32>,
    #[serde(default)]
    step: Vec<RawStep>,
    start: Option<StartCommand>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    run: Option<String>,
    copy: Option<String>,
    to: Option<String>,
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    user: Option<String>,
    cwd: Option<String>,
    apt: Option<Vec<String>>,
    pip: Option<Vec<String>>,
    npm: Option<Vec<String>>,
}

const KINDS: &str = "run, copy, env, workdir, user, apt, pip or npm";

impl RawStep {
    fn into_step(
        self,
        n: usize,
        context: &Path,
        archives: &mut Vec<crate::Archive>,
    ) -> Result<BuildStep, RecipeError> {
        let err = |message: String| RecipeError::Step { step: n, message };
        let kinds = [
            self.run.is_some(),
            self.copy.is_some(),
            self.env.is_some(),
            self.workdir.is_some(),
            self.apt.is_some(),
            self.pip.is_some(),
            self.npm.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds > 1 {
            return Err(err(format!("give exactly one of {KINDS}")));
        }
        let only = |allowed: &[&str], step: BuildStep| {
            let given = [
                ("to", self.to.is_some()),
                ("cwd", self.cwd.is_some()),
                ("user", self.user.is_some()),
            ];
            match given
                .iter()
                .find(|(name, set)| *set && !allowed.contains(name))
            {
                Some((name, _)) => Err(err(format!(
                    "`{name}` has no meaning in a {} step",
                    step.kind()
                ))),
                None => Ok(step),
            }
        };
        if let Some(command) = self.run.clone() {
            return only(
                &["cwd", "user"],
                BuildStep::Run {
                    command,
                    user: self.user.clone(),
                    cwd: self.cwd.clone(),
                },
            );
        }
        if let Some(source) = self.copy.clone() {
            let dest = self
                .to
                .clone()
                .ok_or_else(|| err("a copy step needs `to`, the directory it lands in".into()))?;
            let path = inside(context, &source)?;
            let packed = archive::pack(&path, None)?;
            let hash = packed.hash.clone();
            archives.push(packed);
            return only(
                &["to", "user"],
                BuildStep::Copy {
                    archive: hash,
                    dest,
                    user: self.user.clone(),
                    source: None,
                    mode: None,
                },
            );
        }
        if let Some(vars) = self.env.clone() {
            return only(&[], BuildStep::Env { vars });
        }
        if let Some(path) = self.workdir.clone() {
            return only(&[], BuildStep::Workdir { path });
        }
        if let Some(packages) = self.apt.clone() {
            return only(&[], BuildStep::Apt { packages });
        }
        if let Some(packages) = self.pip.clone() {
            return only(&[], BuildStep::Pip { packages });
        }
        if let Some(packages) = self.npm.clone() {
            return only(&[], BuildStep::Npm { packages });
        }
        match self.user.clone() {
            Some(name) => only(&["user"], BuildStep::User { name }),
            None => Err(err(format!("give one of {KINDS}"))),
        }
    }
}

/// Reads a recipe file; copy sources are taken from `context`.
pub fn from_toml(text: &str, context: &Path) -> Result<Prepared, RecipeError> {
    let file: RecipeFile = toml::from_str(text).map_err(|e| RecipeError::Toml(e.to_string()))?;
    let mut archives = Vec::new();
    let steps = file
        .step
        .into_iter()
        .enumerate()
        .map(|(i, raw)| raw.into_step(i + 1, context, &mut archives))
        .collect::<Result<Vec<_>, _>>()?;
    let recipe = Recipe {
        base: file.base,
        image: file.image,
        user: None,
        workdir: None,
        steps,
        start: file.start,
        kind: file.kind,
        vcpus: file.vcpus,
        memory_mb: file.memory_mb,
        disk_size_mb: file.disk_size_mb,
    };
    finish(file.name, recipe, file.timeout_sec, archives, Vec::new())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_kind_of_step_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("site")).unwrap();
        std::fs::write(dir.path().join("site/index.html"), "hi").unwrap();
        let text = r#"
            name = "web"
            base = "python"
            memory_mb = 512
            [[step]]
            run = "echo one"
            user = "user"
            cwd = "/tmp"
            [[step]]
            copy = "site"
            to = "/srv/site"
            [[step]]
            env = { PORT = "8080" }
            [[step]]
            workdir = "/srv/site"
            [[step]]
            user = "user"
            [[step]]
            apt = ["curl"]
            [[step]]
            pip = ["flask"]
            [[step]]
            npm = ["left-pad"]
            [start]
            command = "python3 -m http.server $PORT"
            ready = "true"
        "#;
        let p = from_toml(text, dir.path()).unwrap();
        assert_eq!(p.name.as_deref(), Some("web"));
        assert_eq!(p.recipe.steps.len(), 8);
        assert_eq!(p.archives.len(), 1);
        match &p.recipe.steps[1] {
            BuildStep::Copy { archive, dest, .. } => {
                assert_eq!(archive, &p.archives[0].hash);
                assert_eq!(dest, "/srv/site");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(p.recipe.steps[4], BuildStep::User { .. }));
        assert_eq!(p.recipe.start.unwrap().ready.as_deref(), Some("true"));
    }

    #[test]
    fn mistakes_name_their_step() {
        let dir = tempfile::tempdir().unwrap();
        let err = |t: &str| from_toml(t, dir.path()).unwrap_err().to_string();
        assert!(
            err("[[step]]\nrun = \"a\"\napt = [\"b\"]").starts_with("step 1: give exactly one")
        );
        assert!(
            err("[[step]]\nrun = \"a\"\n[[step]]\nenv = {A = \"1\"}\ncwd = \"/\"")
                .starts_with("step 2: `cwd`")
        );
        assert!(err("[[step]]\ncopy = \"nope\"\nto = \"/x\"").contains("does not exist"));
        assert!(err("[[step]]\ncopy = \"../x\"\nto = \"/x\"").contains("leaves"));
        assert!(err("[[step]]\ncopy = \"x\"").contains("needs `to`"));
        assert!(err("[[step]]\n").contains("give one of"));
        assert!(err("colour = 1").contains("unknown field"));
        assert!(err("[[step]]\napt = [\"-y\"]").contains("not a valid package"));
    }
}
