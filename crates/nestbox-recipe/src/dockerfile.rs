//! Dockerfiles turned into recipes.
//!
//! | Dockerfile | recipe |
//! |---|---|
//! | `FROM image` | the base ([`base_for_image`]): Debian 12 and Python 3.11 images map to our `minimal` and `python` templates (no registry needed); a plain name (no tag, path or registry) is a template of ours or the team's; any other image is pulled from its registry |
//! | `ARG name[=default]` | a build argument (`--build-arg` overrides), substituted in later instructions and exported to `RUN` steps (never kept in the template) |
//! | `RUN cmd` / `RUN ["a", "b"]` | a run step |
//! | `COPY`/`ADD [--chown=u] src… dest` | a copy step per source (local paths; a single file to a `dest` that is not `.`, `..` and has no trailing `/` takes that name) |
//! | `ENV k=v …` / `ENV k v` | an env step |
//! | `WORKDIR`, `USER` | workdir and user steps |
//! | `CMD`, `ENTRYPOINT` | the start command (entrypoint then command) |
//! | `HEALTHCHECK [--start-period=D] CMD …` | the start command's ready check; `--start-period` is how long it may take to pass (default 120 s); other options have no effect |
//! | `EXPOSE`, `LABEL`, `MAINTAINER`, `STOPSIGNAL`, `VOLUME` | nothing (a warning) |
//!
//! Refused, with the line: several `FROM`s (multi-stage builds), `COPY --from`, URLs in
//! `ADD`, wildcards in sources, `SHELL` and `ONBUILD`.

use std::collections::BTreeMap;
use std::path::Path;

use nestbox_types::api::{BuildStep, Recipe, StartCommand};

use crate::{Prepared, RecipeError, archive, finish, inside};

/// Where a `FROM` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// A template of ours or the team's.
    Template(String),
    /// An image pulled from its registry.
    Image(String),
}

/// What `FROM image` starts from: Debian 12 images are our `minimal` template, Python 3.11
/// images our `python`; a plain name (no registry, tag or path) is a template name; any
/// other image is pulled from its registry.
pub fn base_for_image(image: &str) -> Result<Base, String> {
    let (repo, tag) = match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (image, "latest"),
    };
    let repo = repo
        .strip_prefix("docker.io/")
        .unwrap_or(repo)
        .strip_prefix("library/")
        .unwrap_or(repo.strip_prefix("docker.io/").unwrap_or(repo));
    match repo {
        "debian" => {
            let ok = [
                "latest",
                "stable",
                "12",
                "bookworm",
                "stable-slim",
                "12-slim",
                "bookworm-slim",
            ];
            if ok.contains(&tag) {
                Ok(Base::Template("minimal".into()))
            } else {
                Ok(Base::Image(image.to_string()))
            }
        }
        "python" => {
            let ok = tag == "latest"
                || tag == "3"
                || tag == "3.11"
                || tag.starts_with("3.11.")
                || tag.starts_with("3.11-")
                || tag.starts_with("3-");
            if ok {
                Ok(Base::Template("python".into()))
            } else {
                Ok(Base::Image(image.to_string()))
            }
        }
        "scratch" => Err("`scratch` has no shell for steps to run in".into()),
        name if image == name
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) =>
        {
            Ok(Base::Template(name.to_string()))
        }
        _ => Ok(Base::Image(image.to_string())),
    }
}

/// Joins continuation lines and drops comments: `(first line number, text)` per
/// instruction.
fn instructions(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        if current.is_none() && trimmed.is_empty() {
            continue;
        }
        let (line, mut buf) = current.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                buf.push_str(part);
                buf.push(' ');
                current = Some((line, buf));
            }
            None => {
                buf.push_str(trimmed);
                out.push((line, buf));
            }
        }
    }
    if let Some(last) = current {
        out.push(last);
    }
    out
}

/// Splits words the way a shell would for `ENV` and `ARG` values: quotes group, a
/// backslash escapes.
fn words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
                in_word = true;
            }
            (_, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("an unterminated quote".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// `$name`, `${name}` and `${name:-default}` replaced from `vars` (unknown: empty).
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek() == Some(&'$') {
            out.push('$');
            chars.next();
            continue;
        }
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n.to_string(), Some(d.to_string())),
                None => (inner, None),
            };
            match vars.get(&name) {
                Some(v) if !v.is_empty() || default.is_none() => out.push_str(v),
                _ => out.push_str(&default.unwrap_or_default()),
            }
        } else {
            let mut name = String::new();
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '_' {
                    name.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            if name.is_empty() {
                out.push('$');
            } else {
                out.push_str(vars.get(&name).map(String::as_str).unwrap_or_default());
            }
        }
    }
    out
}

/// A value quoted for `/bin/sh`.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A Docker duration (`90s`, `5m`, `1m30s`, `1h`) in whole seconds (at least 1).
fn duration_sec(text: &str) -> Result<u32, String> {
    let bad = || format!("`{text}` is not a duration such as 90s, 5m or 1m30s");
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut units = text.chars().peekable();
    while let Some(c) = units.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let millis = match c {
            'h' => value * 3_600_000,
            's' => value * 1000,
            'm' if units.peek() == Some(&'s') => {
                units.next();
                value
            }
            'm' => value * 60_000,
            _ => return Err(bad()),
        };
        total = total.saturating_add(millis);
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    u32::try_from(total.div_ceil(1000)).map_err(|_| bad())
}

/// The exec form (`["a", "b"]`) as a shell command line, or the shell form as it is.
fn command_line(args: &str) -> Result<String, String> {
    let t = args.trim();
    if t.starts_with('[') {
        let argv: Vec<String> =
            serde_json::from_str(t).map_err(|e| format!("not a JSON array of strings: {e}"))?;
        if argv.is_empty() {
            return Err("an empty command".into());
        }
        return Ok(argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "));
    }
    Ok(t.to_string())
}

/// Reads a Dockerfile; copy sources are taken from `context`.
pub fn from_dockerfile(
    text: &str,
    context: &Path,
    build_args: &BTreeMap<String, String>,
) -> Result<Prepared, RecipeError> {
    let mut recipe = Recipe::default();
    let mut archives = Vec::new();
    let mut warnings = Vec::new();
    // Values substituted in instructions: ARGs, then ENVs over them.
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut from_seen = false;
    let mut entrypoint: Option<String> = None;
    let mut cmd: Option<String> = None;
    let mut ready: Option<String> = None;
    let mut ready_timeout_sec: Option<u32> = None;

    for (line, text) in instructions(text) {
        let fail = |message: String| RecipeError::Dockerfile { line, message };
        let (word, rest) = text
            .split_once(char::is_whitespace)
            .map(|(w, r)| (w, r.trim()))
            .unwrap_or((text.as_str(), ""));
        let keyword = word.to_ascii_uppercase();
        let vars: BTreeMap<String, String> = args
            .iter()
            .chain(env.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !from_seen && !matches!(keyword.as_str(), "FROM" | "ARG") {
            return Err(fail(format!("{keyword} before FROM")));
        }
        match keyword.as_str() {
            "FROM" => {
                if from_seen {
                    return Err(fail(
                        "multi-stage builds (a second FROM) are not supported".into(),
                    ));
                }
                from_seen = true;
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let image = parts
                    .iter()
                    .find(|p| !p.starts_with("--"))
                    .ok_or_else(|| fail("FROM names no image".into()))?;
                let image = substitute(image, &vars);
                match base_for_image(&image).map_err(fail)? {
                    Base::Template(t) => recipe.base = Some(t),
                    Base::Image(i) => recipe.image = Some(i),
                }
            }
            "ARG" => {
                for w in words(rest).map_err(fail)? {
                    let (name, default) = match w.split_once('=') {
                        Some((n, d)) => (n.to_string(), Some(d.to_string())),
                        None => (w.clone(), None),
                    };
                    let value = build_args
                        .get(&name)
                        .cloned()
                        .or(default)
                        .unwrap_or_default();
                    args.insert(name, value);
                }
            }
            "RUN" => {
                if rest.starts_with("--") {
                    return Err(fail(
                        "RUN options (--mount, --network) are not supported".into(),
                    ));
                }
                let mut command = command_line(rest).map_err(fail)?;
                // ARGs reach the command as variables, not as the template's environment.
                let exported: Vec<String> = args
                    .iter()
                    .filter(|(k, _)| !env.contains_key(*k))
                    .map(|(k, v)| format!("{k}={}", quote(v)))
                    .collect();
                if !exported.is_empty() {
                    command = format!("export {}; {command}", exported.join(" "));
                }
                recipe.steps.push(BuildStep::Run {
                    command,
                    user: None,
                    cwd: None,
                });
            }
            "COPY" | "ADD" => {
                let mut parts = if rest.trim_start().starts_with('[') {
                    serde_json::from_str::<Vec<String>>(rest)
                        .map_err(|e| fail(format!("not a JSON array of strings: {e}")))?
                } else {
                    words(rest).map_err(fail)?
                };
                let mut owner = None;
                while parts.first().is_some_and(|p| p.starts_with("--")) {
                    let opt = parts.remove(0);
                    if let Some(chown) = opt.strip_prefix("--chown=") {
                        let user = substitute(chown, &vars);
                        owner = Some(user.split(':').next().unwrap_or_default().to_string());
                    } else if opt.starts_with("--from") {
                        return Err(fail(
                            "COPY --from (multi-stage builds) is not supported".into(),
                        ));
                    } else if opt.starts_with("--chmod") || opt.starts_with("--link") {
                        warnings.push(format!("line {line}: {opt} has no effect here"));
                    } else {
                        return Err(fail(format!("{keyword} option {opt} is not supported")));
                    }
                }
                if parts.len() < 2 {
                    return Err(fail(format!("{keyword} needs a source and a destination")));
                }
                let dest = substitute(&parts.pop().unwrap_or_default(), &vars);
                let single = parts.len() == 1;
                for src in parts {
                    let src = substitute(&src, &vars);
                    if src.contains("://") {
                        return Err(fail(
                            "ADD from a URL is not supported; RUN curl instead".into(),
                        ));
                    }
                    if src.contains(['*', '?', '[']) {
                        return Err(fail(format!("wildcards in `{src}` are not supported")));
                    }
                    let path = inside(context, &src)?;
                    // `COPY file /dest` writes the file *as* /dest; `/dest/` means into it.
                    let into_dir = dest.ends_with('/')
                        || dest == "."
                        || dest == ".."
                        || dest.ends_with("/.")
                        || dest.ends_with("/..");
                    let (packed, into) = if path.is_file() && single && !into_dir {
                        let (dir, name) = match dest.rsplit_once('/') {
                            Some(("", name)) => ("/".to_string(), name.to_string()),
                            Some((dir, name)) => (dir.to_string(), name.to_string()),
                            None => (".".to_string(), dest.clone()),
                        };
                        (archive::pack(&path, Some(&name))?, dir)
                    } else {
                        (archive::pack(&path, None)?, dest.clone())
                    };
                    recipe.steps.push(BuildStep::Copy {
                        archive: packed.hash.clone(),
                        dest: into,
                        // Docker's copies are root's unless `--chown` says otherwise.
                        user: Some(owner.clone().unwrap_or_else(|| "root".into())),
                        source: None,
                        mode: None,
                    });
                    archives.push(packed);
                }
            }
            "ENV" => {
                let ws = words(rest).map_err(fail)?;
                let mut vars_set = BTreeMap::new();
                if ws.first().is_some_and(|w| !w.contains('=')) {
                    // The old form: `ENV name value with spaces`.
                    let (name, value) = rest
                        .split_once(char::is_whitespace)
                        .ok_or_else(|| fail("ENV needs a value".into()))?;
                    vars_set.insert(name.to_string(), substitute(value.trim(), &vars));
                } else {
                    for w in ws {
                        let (k, v) = w
                            .split_once('=')
                            .ok_or_else(|| fail(format!("`{w}` is not name=value")))?;
                        vars_set.insert(k.to_string(), substitute(v, &vars));
                    }
                }
                env.extend(vars_set.clone());
                recipe.steps.push(BuildStep::Env { vars: vars_set });
            }
            "WORKDIR" => recipe.steps.push(BuildStep::Workdir {
                path: substitute(rest, &vars),
            }),
            "USER" => {
                let user = substitute(rest, &vars);
                recipe.steps.push(BuildStep::User {
                    name: user.split(':').next().unwrap_or_default().to_string(),
                });
            }
            "CMD" => cmd = Some(command_line(rest).map_err(fail)?),
            "ENTRYPOINT" => entrypoint = Some(command_line(rest).map_err(fail)?),
            "HEALTHCHECK" => {
                if rest.eq_ignore_ascii_case("NONE") {
                    ready = None;
                    ready_timeout_sec = None;
                } else {
                    let at = rest
                        .find("CMD")
                        .ok_or_else(|| fail("HEALTHCHECK needs CMD".into()))?;
                    ready_timeout_sec = None;
                    for option in rest[..at].split_whitespace() {
                        if let Some(d) = option.strip_prefix("--start-period=") {
                            ready_timeout_sec = Some(duration_sec(d).map_err(fail)?);
                        }
                    }
                    ready = Some(command_line(&rest[at + 3..]).map_err(fail)?);
                }
            }
            "EXPOSE" | "LABEL" | "MAINTAINER" | "STOPSIGNAL" | "VOLUME" => {
                warnings.push(format!("line {line}: {keyword} has no effect here"));
            }
            other => return Err(fail(format!("{other} is not supported"))),
        }
    }
    if !from_seen {
        return Err(RecipeError::Dockerfile {
            line: 1,
            message: "no FROM".into(),
        });
    }
    let start = match (entrypoint, cmd) {
        (Some(e), Some(c)) => Some(format!("{e} {c}")),
        (Some(e), None) => Some(e),
        (None, Some(c)) => Some(c),
        (None, None) => None,
    };
    if ready.is_some() && start.is_none() {
        warnings.push("HEALTHCHECK without CMD or ENTRYPOINT has no effect".into());
    }
    recipe.start = start.map(|command| StartCommand {
        command,
        ready,
        ready_timeout_sec,
    });
    finish(None, recipe, None, archives, warnings)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn build(text: &str) -> Result<Prepared, RecipeError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/main.py"), "print(1)").unwrap();
        std::fs::write(dir.path().join("conf.ini"), "x=1").unwrap();
        from_dockerfile(
            text,
            dir.path(),
            &BTreeMap::from([("MODE".into(), "prod".into())]),
        )
    }

    #[test]
    fn a_dockerfile_becomes_a_recipe() {
        let p = build(
            "# a comment\nARG MODE=dev\nARG VER=1\nFROM python:3.11-slim\n\
             ENV APP_HOME=/srv/app \\\n    GREETING=\"hello world\"\n\
             WORKDIR $APP_HOME\nCOPY --chown=user:user app/ ./\nCOPY conf.ini /etc/app.ini\nCOPY conf.ini .\n\
             RUN echo $MODE > mode.txt\nRUN [\"python3\", \"-c\", \"print('hi there')\"]\n\
             USER user\nEXPOSE 8000\n\
             HEALTHCHECK --interval=5s CMD curl -sf localhost:8000\n\
             ENTRYPOINT [\"python3\"]\nCMD [\"-m\", \"http.server\"]\n",
        )
        .unwrap();
        let r = &p.recipe;
        assert_eq!(r.base.as_deref(), Some("python"));
        let kinds: Vec<_> = r.steps.iter().map(BuildStep::kind).collect();
        assert_eq!(
            kinds,
            [
                "env", "workdir", "copy", "copy", "copy", "run", "run", "user"
            ]
        );
        // A file copied to `.` lands in it under its own name.
        assert!(matches!(&r.steps[4], BuildStep::Copy { dest, .. } if dest == "."));
        assert_eq!(
            r.steps[0],
            BuildStep::Env {
                vars: BTreeMap::from([
                    ("APP_HOME".into(), "/srv/app".into()),
                    ("GREETING".into(), "hello world".into())
                ])
            }
        );
        assert_eq!(
            r.steps[1],
            BuildStep::Workdir {
                path: "/srv/app".into()
            }
        );
        match (&r.steps[2], &r.steps[3]) {
            (
                BuildStep::Copy {
                    dest: d1, user: u1, ..
                },
                BuildStep::Copy {
                    dest: d2, user: u2, ..
                },
            ) => {
                assert_eq!((d1.as_str(), u1.as_deref()), ("./", Some("user")));
                assert_eq!((d2.as_str(), u2.as_deref()), ("/etc", Some("root")));
            }
            other => panic!("{other:?}"),
        }
        // The build argument given wins over the default, and is exported, not kept.
        assert_eq!(
            r.steps[5],
            BuildStep::Run {
                command: "export MODE=prod VER=1; echo $MODE > mode.txt".into(),
                user: None,
                cwd: None
            }
        );
        match &r.steps[6] {
            BuildStep::Run { command, .. } => {
                assert!(
                    command.ends_with("python3 -c 'print('\\''hi there'\\'')'"),
                    "{command}"
                )
            }
            other => panic!("{other:?}"),
        }
        let start = r.start.clone().unwrap();
        assert_eq!(start.command, "python3 -m http.server");
        assert_eq!(start.ready.as_deref(), Some("curl -sf localhost:8000"));
        assert_eq!(start.ready_timeout_sec, None);
        assert_eq!(p.archives.len(), 3);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn a_healthcheck_start_period_is_how_long_the_ready_check_may_take() {
        let start = |t: &str| build(t).unwrap().recipe.start.unwrap();
        let s = start(
            "FROM debian
CMD [\"srv\"]
HEALTHCHECK --interval=5s --start-period=10m CMD [\"check\"]
",
        );
        assert_eq!(
            (s.ready.as_deref(), s.ready_timeout_sec),
            (Some("check"), Some(600))
        );
        assert_eq!(duration_sec("1m30s"), Ok(90));
        assert_eq!(duration_sec("1h"), Ok(3600));
        assert_eq!(duration_sec("1500ms"), Ok(2));
        for bad in ["", "10", "5x", "s", "0s"] {
            assert!(duration_sec(bad).is_err(), "{bad}");
        }
        let refused = build(
            "FROM debian
CMD srv
HEALTHCHECK --start-period=soon CMD check
",
        );
        assert!(matches!(
            refused.unwrap_err(),
            RecipeError::Dockerfile { line: 3, .. }
        ));
    }

    #[test]
    fn what_cannot_be_built_is_refused_with_its_line() {
        let line = |t: &str| match build(t).unwrap_err() {
            RecipeError::Dockerfile { line, .. } => line,
            other => panic!("{other}"),
        };
        assert_eq!(line("FROM debian\nFROM debian\n"), 2);
        assert_eq!(line("FROM debian\n\nCOPY --from=x a b\n"), 3);
        assert_eq!(line("RUN true\n"), 1);
        assert_eq!(line("FROM debian\nSHELL [\"bash\"]\n"), 2);
        assert_eq!(line("FROM debian\nADD https://x/y /z\n"), 2);
        assert_eq!(line("FROM debian\nCOPY *.py /app/\n"), 2);
        assert!(matches!(
            build("FROM debian\nCOPY ../secret /x\n").unwrap_err(),
            RecipeError::Source { .. }
        ));
    }

    #[test]
    fn images_map_to_bases() {
        let t = |n: &str| Base::Template(n.into());
        let i = |n: &str| Base::Image(n.into());
        assert_eq!(
            base_for_image("debian:bookworm-slim").unwrap(),
            t("minimal")
        );
        assert_eq!(
            base_for_image("docker.io/library/python:3.11").unwrap(),
            t("python")
        );
        assert_eq!(base_for_image("my-template").unwrap(), t("my-template"));
        assert_eq!(base_for_image("node:20").unwrap(), i("node:20"));
        assert_eq!(base_for_image("debian:11").unwrap(), i("debian:11"));
        assert_eq!(
            base_for_image("127.0.0.1:5000/team/app@sha256:ab").unwrap(),
            i("127.0.0.1:5000/team/app@sha256:ab")
        );
        assert!(base_for_image("scratch").is_err());
    }

    #[test]
    fn substitution_and_words() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(substitute("$A/${A}/${B:-d}/\\$A/$", &vars), "x/x/d/$A/$");
        assert_eq!(
            words(r#"a="b c" d\ e 'f g'"#).unwrap(),
            ["a=b c", "d e", "f g"]
        );
        assert!(words("\"open").is_err());
    }
}
