//! The sandbox manager on the in-memory host (`nestbox_agent::host::fake`), without root:
//! every lifecycle operation — create (boot, clone of a snapshot template, take-over of a
//! pooled clone), pause (holding the VMM or not), resume (held or restored), snapshot into
//! a template (snapshot or image) and destroy — is run once to learn its steps, then again
//! with a failure injected at each of those steps in turn. After each run the host must hold
//! exactly what the manager's records say (networks, VMMs, slot files, directories, guest
//! memory), every sandbox must be in a state it can move on from, and the operation must
//! have had the outcome its contract promises: a failed create leaves nothing, a failed
//! pause leaves the sandbox running, a failed resume leaves it paused (and a later resume
//! works), a failed snapshot leaves the sandbox as it was and no template, a destroy always
//! removes the sandbox, a sandbox moved from another host is taken over whole (and
//! resumes) or leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nestbox_agent::host::fake::{self, FakeHost, Step};
use nestbox_agent::sandbox::state::{self, Phase};
use nestbox_agent::sandbox::{CreateParams, ManagerParts, State};
use nestbox_agent::templates::{Kind, TemplateStore};
use nestbox_agent::{AgentConfig, AgentError, Manager};
use nestbox_hostsys::disk::BaseImages;
use nestbox_hostsys::net::SlotAllocator;
use nestbox_image::ImageStore;
use nestbox_types::egress::EgressRules;
use nestbox_types::{SandboxId, TeamId, TemplateId};

const TAG: &str = "faults";

/// A manager on a fake host, in a directory of its own.
struct Rig {
    _tmp: tempfile::TempDir,
    fake: FakeHost,
    manager: Manager,
    data: PathBuf,
    mem_root: PathBuf,
    slots: SlotAllocator,
    team: TeamId,
}

impl Rig {
    fn new(pause_hold: Duration, clone_pool: u32) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let images = root.join("images");
        fake::write_images(&images, "minimal").unwrap();
        let data = root.join("data");
        std::fs::create_dir_all(data.join("sandboxes")).unwrap();
        let mut cfg = AgentConfig::new(&data, &images, "http://127.0.0.1:9");
        cfg.slots_dir = root.join("slots");
        cfg.memory_root = root.join("shm");
        cfg.warm_dir = root.join("warm");
        cfg.warm_templates = Vec::new();
        cfg.dns = Some(Vec::new());
        cfg.boot_timeout = Duration::from_secs(5);
        cfg.pause_hold = pause_hold;
        cfg.clone_pool = clone_pool;
        std::fs::create_dir_all(&cfg.memory_root).unwrap();
        let mem_root = nestbox_agent::sandbox::mem_root(&cfg.memory_root, TAG);
        std::fs::create_dir_all(&mem_root).unwrap();
        let fake = FakeHost::new();
        let slots = SlotAllocator::new(&cfg.slots_dir, TAG).unwrap();
        let manager = Manager::new(ManagerParts {
            tag: TAG.into(),
            host: fake.host(),
            images: ImageStore::new(&images),
            bases: BaseImages::new(data.join("bases")).unwrap(),
            slots: slots.clone(),
            http: reqwest::Client::new(),
            dns: Vec::new(),
            templates: TemplateStore::new(data.join("templates")).unwrap(),
            warm: TemplateStore::new(&cfg.warm_dir).unwrap(),
            cfg: Arc::new(cfg),
        });
        Self {
            _tmp: tmp,
            fake,
            manager,
            data,
            mem_root,
            slots,
            team: TeamId::new(),
        }
    }

    fn params(&self, template: Option<TemplateId>) -> CreateParams {
        CreateParams {
            id: SandboxId::new(),
            team: self.team,
            template: "minimal".into(),
            template_id: template,
            vcpus: 1,
            memory_mb: 128,
            disk_size_mb: 0,
            timeout_sec: 0,
            env: HashMap::from([("FROM".to_string(), "create".to_string())]),
            access_token: format!("token-{}", SandboxId::new()),
            no_pool: false,
            default_user: None,
            default_workdir: None,
            egress: EgressRules::default(),
        }
    }

    async fn create(&self, template: Option<TemplateId>) -> SandboxId {
        let p = self.params(template);
        let id = p.id;
        self.manager.create(p).await.expect("create");
        id
    }

    /// A snapshot template made from a fresh sandbox (which is then destroyed).
    async fn snapshot_template(&self) -> TemplateId {
        let id = self.create(None).await;
        let tpl = TemplateId::new();
        self.manager
            .create_template(id, tpl, Kind::Snapshot)
            .await
            .expect("snapshot template");
        self.manager.destroy(id).await.unwrap();
        tpl
    }

    /// Waits for the clone pool to settle (filled or given up).
    async fn pool_settled(&self) {
        for _ in 0..500 {
            if !self.manager.pool_filling() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the clone pool never settled");
    }

    /// The guest answers with the sandbox's token and holds the create's environment.
    async fn answers(&self, id: SandboxId) {
        let guest = self.manager.running(id).unwrap().guest().unwrap();
        let env = guest.envs().await.expect("the guest answers");
        assert_eq!(
            env.get("FROM").map(String::as_str),
            Some("create"),
            "{env:?}"
        );
    }

    /// The host holds exactly what the records say, and every record is in a state the
    /// manager moves on from.
    fn consistent(&self, context: &str) {
        let handles = self.manager.list();
        let mut nets = BTreeSet::new();
        let mut vmms = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        for h in &handles {
            let id = h.facts.id;
            let dir = nestbox_agent::sandbox::sandbox_dir(&self.data, id);
            let st = state::read(&dir)
                .unwrap_or_else(|| panic!("{context}: sandbox {id} has no state record"));
            let state = h.state();
            match (state, st.phase) {
                (State::Running, Phase::Running) | (State::Paused, Phase::Paused) => {}
                (s, p) => panic!("{context}: sandbox {id} is {s:?} but recorded {p:?}"),
            }
            if state == State::Running {
                assert!(
                    st.vmm_pid.is_some(),
                    "{context}: running {id} without a VMM"
                );
                assert!(
                    st.slot.is_some(),
                    "{context}: running {id} without a network"
                );
            }
            if let Some(slot) = st.slot {
                nets.insert(slot);
            }
            if let Some(pid) = st.vmm_pid {
                assert!(
                    st.slot.is_some(),
                    "{context}: {id} has a VMM and no network"
                );
                vmms.insert(pid);
            }
            if state == State::Paused {
                let snapshot = ["snapshot", "snapshot.partial"]
                    .iter()
                    .any(|d| dir.join(d).join("snapshot.json").exists())
                    || self
                        .mem_root
                        .join(id.to_string())
                        .join("snapshot")
                        .join("snapshot.json")
                        .exists();
                assert!(snapshot, "{context}: paused {id} has no whole snapshot");
            }
            dirs.insert(id.to_string());
            // A taken-over clone's directory keeps its old name too (its VMM's paths).
            if let Some(alias) = st.dir_alias.as_ref().and_then(|a| a.file_name()) {
                dirs.insert(alias.to_string_lossy().into_owned());
            }
        }
        // Pooled clones are the manager's too (not listed, but holding a VMM and network).
        let pooled = self.manager.pooled();
        let ledger_nets: BTreeSet<u32> = self.fake.networks().into_iter().collect();
        let ledger_vmms: BTreeSet<u32> = self.fake.vmms().keys().copied().collect();
        assert_eq!(
            ledger_nets.len(),
            nets.len() + pooled,
            "{context}: networks on the host {ledger_nets:?}, recorded {nets:?} (+{pooled} pooled)"
        );
        assert!(
            nets.is_subset(&ledger_nets),
            "{context}: a recorded network is gone"
        );
        assert_eq!(
            ledger_vmms.len(),
            vmms.len() + pooled,
            "{context}: VMMs on the host {ledger_vmms:?}, recorded {vmms:?} (+{pooled} pooled)"
        );
        assert!(
            vmms.is_subset(&ledger_vmms),
            "{context}: a recorded VMM is gone"
        );
        let slot_files: BTreeSet<u32> = self
            .slots
            .owned()
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            slot_files, ledger_nets,
            "{context}: slot files against networks"
        );
        let on_disk = names(&self.data.join("sandboxes"));
        assert_eq!(
            on_disk.len(),
            dirs.len() + pooled,
            "{context}: sandbox directories {on_disk:?}, sandboxes {dirs:?} (+{pooled} pooled)"
        );
        assert!(
            dirs.is_subset(&on_disk),
            "{context}: a sandbox lost its directory"
        );
        let mem = names(&self.mem_root);
        assert!(
            mem.len() <= dirs.len() + pooled,
            "{context}: guest memory directories {mem:?} for sandboxes {dirs:?}"
        );
    }

    /// Destroys everything and checks that nothing is left.
    async fn empty(&self, context: &str) {
        for h in self.manager.list() {
            self.manager.destroy(h.facts.id).await.unwrap();
        }
        self.manager.drain_pools().await;
        self.consistent(context);
        assert!(self.fake.networks().is_empty(), "{context}: networks left");
        assert!(self.fake.vmms().is_empty(), "{context}: VMMs left");
        assert!(names(&self.data.join("sandboxes")).is_empty(), "{context}");
        assert!(
            names(&self.mem_root).is_empty(),
            "{context}: guest memory left"
        );
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The steps of `trace` each with how many calls of the same step precede it: the
/// arguments to fail exactly that call.
fn points(trace: &[Step]) -> Vec<(Step, u32)> {
    let mut seen: HashMap<Step, u32> = HashMap::new();
    trace
        .iter()
        .map(|s| {
            let n = seen.entry(*s).or_default();
            let point = (*s, *n);
            *n += 1;
            point
        })
        .collect()
}

/// Runs `op` (after `prepare`) once cleanly to learn its steps, then once per step with
/// that step failing; `check` judges each outcome. Returns how many faults were injected.
async fn sweep<P, T>(
    rig: &Rig,
    name: &str,
    prepare: impl AsyncFn(&Rig) -> P,
    op: impl AsyncFn(&Rig, &P) -> Result<T, nestbox_agent::AgentError>,
    check: impl AsyncFn(&Rig, &P, Result<T, nestbox_agent::AgentError>, Option<Step>),
) -> usize {
    let p = prepare(rig).await;
    rig.fake.take_trace();
    let clean = op(rig, &p).await;
    let trace = rig.fake.take_trace();
    assert!(clean.is_ok(), "{name}: the clean run failed");
    check(rig, &p, clean, None).await;
    rig.consistent(&format!("{name} (clean)"));
    rig.empty(&format!("{name} (clean), emptied")).await;
    assert!(!trace.is_empty(), "{name}: no host step taken");
    let points = points(&trace);
    let mut hits = 0;
    for (step, after) in &points {
        let context = format!("{name} failing at {step} #{after}");
        let p = prepare(rig).await;
        rig.fake.take_trace();
        rig.fake.fail(*step, *after);
        let outcome = op(rig, &p).await;
        // A step the operation no longer reached (an earlier one took another path) is
        // not a failure of the sweep, but it must be rare: see the count below.
        let hit = !rig.fake.armed();
        hits += usize::from(hit);
        rig.fake.disarm();
        check(rig, &p, outcome, hit.then_some(*step)).await;
        rig.consistent(&context);
        rig.empty(&format!("{context}, emptied")).await;
    }
    eprintln!(
        "{name}: {hits} of {} steps failed in turn: {trace:?}",
        points.len()
    );
    // Every step of the clean run is reached again when nothing failed before it.
    assert_eq!(
        hits,
        points.len(),
        "{name}: some injected faults were never hit"
    );
    points.len()
}

#[tokio::test]
async fn a_create_that_fails_at_any_step_leaves_nothing() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let n = sweep(
        &rig,
        "create (boot)",
        async |_| (),
        async |rig, _| {
            // The first create of its size: the base image is made too.
            let _ = std::fs::remove_dir_all(rig.data.join("bases"));
            let p = rig.params(None);
            let id = p.id;
            rig.manager.create(p).await.map(|_| id)
        },
        async |rig, _, outcome, fault| match (outcome, fault) {
            (Ok(id), None) => rig.answers(id).await,
            (Ok(id), Some(step)) => panic!("create of {id} succeeded although {step} failed"),
            (Err(e), Some(_)) => {
                assert!(rig.manager.list().is_empty(), "failed create listed: {e}")
            }
            (Err(e), None) => panic!("create failed with no fault: {e}"),
        },
    )
    .await;
    assert!(n >= 7, "only {n} steps");
}

#[tokio::test]
async fn a_clone_create_that_fails_at_any_step_leaves_nothing() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let tpl = rig.snapshot_template().await;
    rig.empty("after making the template").await;
    sweep(
        &rig,
        "create (clone)",
        async |_| (),
        async |rig, _| {
            let p = rig.params(Some(tpl));
            let id = p.id;
            rig.manager.create(p).await.map(|_| id)
        },
        async |rig, _, outcome, fault| match (outcome, fault) {
            (Ok(id), None) => rig.answers(id).await,
            (Ok(id), Some(step)) => panic!("clone {id} succeeded although {step} failed"),
            (Err(_), Some(_)) => assert!(rig.manager.list().is_empty()),
            (Err(e), None) => panic!("clone failed with no fault: {e}"),
        },
    )
    .await;
    // The template is untouched by every failed clone: one more starts from it.
    let id = rig.create(Some(tpl)).await;
    rig.answers(id).await;
    rig.empty("done").await;
}

#[tokio::test]
async fn taking_over_a_pooled_clone_that_fails_leaves_nothing() {
    let rig = Rig::new(Duration::from_secs(300), 1);
    let tpl = rig.snapshot_template().await;
    rig.empty("after making the template").await;
    sweep(
        &rig,
        "create (pool take-over)",
        async |rig| {
            // A first clone fills the pool behind it.
            let first = rig.create(Some(tpl)).await;
            rig.pool_settled().await;
            assert_eq!(rig.manager.pooled(), 1, "the pool was not filled");
            first
        },
        async |rig, _| {
            let p = rig.params(Some(tpl));
            let id = p.id;
            let created = rig.manager.create(p).await.map(|_| id);
            rig.pool_settled().await;
            created
        },
        async |rig, first, outcome, fault| {
            rig.answers(*first).await;
            match (outcome, fault) {
                (Ok(id), _) => rig.answers(id).await,
                (Err(e), None) => panic!("take-over failed with no fault: {e}"),
                (Err(_), Some(_)) => assert_eq!(rig.manager.list().len(), 1),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_pause_that_fails_leaves_the_sandbox_running() {
    for hold in [Duration::from_secs(300), Duration::ZERO] {
        let rig = Rig::new(hold, 0);
        sweep(
            &rig,
            &format!("pause (hold {hold:?})"),
            async |rig| rig.create(None).await,
            async |rig, id| rig.manager.pause(*id).await,
            async |rig, id, outcome, fault| {
                let h = rig.manager.get(*id).expect("the sandbox is kept");
                match (outcome, fault) {
                    (Ok(()), _) => {
                        assert_eq!(h.state(), State::Paused);
                        // It comes back whole.
                        rig.manager.resume(*id).await.unwrap();
                        rig.answers(*id).await;
                    }
                    (Err(e), Some(_)) => {
                        assert_eq!(h.state(), State::Running, "after {e}");
                        rig.answers(*id).await;
                    }
                    (Err(e), None) => panic!("pause failed with no fault: {e}"),
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_resume_that_fails_leaves_the_sandbox_paused_and_resumable() {
    for hold in [Duration::from_secs(300), Duration::ZERO] {
        let rig = Rig::new(hold, 0);
        sweep(
            &rig,
            &format!("resume (hold {hold:?})"),
            async |rig| {
                let id = rig.create(None).await;
                rig.manager.pause(id).await.unwrap();
                id
            },
            async |rig, id| rig.manager.resume(*id).await,
            async |rig, id, outcome, fault| {
                let h = rig.manager.get(*id).expect("the sandbox is kept");
                match (outcome, fault) {
                    (Ok(()), _) => {
                        assert_eq!(h.state(), State::Running);
                        rig.answers(*id).await;
                    }
                    (Err(e), Some(step)) => {
                        assert_eq!(h.state(), State::Paused, "after {step}: {e}");
                        rig.consistent(&format!("resume failed at {step}"));
                        rig.manager.resume(*id).await.expect("a second resume");
                        rig.answers(*id).await;
                    }
                    (Err(e), None) => panic!("resume failed with no fault: {e}"),
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_snapshot_that_fails_leaves_the_sandbox_and_no_template() {
    for kind in [Kind::Snapshot, Kind::Image] {
        let rig = Rig::new(Duration::from_secs(300), 0);
        sweep(
            &rig,
            &format!("template ({kind:?})"),
            async |rig| (rig.create(None).await, TemplateId::new()),
            async |rig, (id, tpl)| rig.manager.create_template(*id, *tpl, kind).await,
            async |rig, (id, tpl), outcome, fault| {
                let h = rig.manager.get(*id).expect("the sandbox is kept");
                assert_eq!(h.state(), State::Running);
                rig.answers(*id).await;
                match (outcome, fault) {
                    (Ok(_), _) => {
                        rig.manager.template(*tpl).expect("stored");
                        rig.manager.delete_template(*tpl).await.unwrap();
                    }
                    (Err(e), Some(step)) => {
                        assert!(rig.manager.template(*tpl).is_err(), "{step}: {e}");
                        let left = names(&rig.data.join("templates"));
                        assert!(left.is_empty(), "after {step}: template files {left:?}");
                    }
                    (Err(e), None) => panic!("template failed with no fault: {e}"),
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_destroy_always_removes_the_sandbox() {
    for paused in [false, true] {
        let rig = Rig::new(Duration::from_secs(300), 0);
        sweep(
            &rig,
            &format!("destroy (paused: {paused})"),
            async |rig| {
                let id = rig.create(None).await;
                if paused {
                    rig.manager.pause(id).await.unwrap();
                }
                id
            },
            async |rig, id| rig.manager.destroy(*id).await,
            async |rig, id, _outcome, _fault| {
                // Whatever failed, the sandbox is gone (its errors are reported).
                assert!(rig.manager.get(*id).is_err());
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_vmm_that_dies_is_cleaned_up() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let id = rig.create(None).await;
    let keep = rig.create(None).await;
    let st = state::read(&nestbox_agent::sandbox::sandbox_dir(&rig.data, id)).unwrap();
    rig.fake.kill(st.vmm_pid.unwrap());
    for _ in 0..1000 {
        if rig.manager.get(id).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        rig.manager.get(id).is_err(),
        "the dead sandbox is still listed"
    );
    rig.consistent("after a VMM died");
    rig.answers(keep).await;
    rig.empty("done").await;
}

#[tokio::test]
async fn a_network_that_cannot_be_removed_keeps_its_slot_until_recovery_removes_it() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let id = rig.create(None).await;
    let slot = state::read(&nestbox_agent::sandbox::sandbox_dir(&rig.data, id))
        .unwrap()
        .slot
        .unwrap();
    // A failed teardown is tried again; one that fails twice is reported.
    rig.fake.fail_times(Step::NetTeardown, 0, 2);
    let err = rig.manager.destroy(id).await.unwrap_err();
    assert!(
        err.public_message().contains("removing the network"),
        "{err}"
    );
    assert!(
        rig.manager.get(id).is_err(),
        "the sandbox is gone all the same"
    );
    assert_eq!(
        rig.fake.networks(),
        vec![slot],
        "the network is still there"
    );
    let taken: Vec<u32> = rig.slots.owned().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(taken, vec![slot], "its slot stays taken");
    // Nothing is set up over it: the next sandbox gets another slot.
    let next = rig.create(None).await;
    rig.answers(next).await;
    rig.manager.destroy(next).await.unwrap();
    // Start-up recovery of this instance removes it.
    let report =
        nestbox_agent::cleanup::run(&rig.data, &rig.mem_root, &rig.slots, &rig.fake.host())
            .await
            .0;
    assert_eq!(report.networks, 1, "{report:?}");
    assert!(rig.fake.networks().is_empty());
    assert!(rig.slots.owned().unwrap().is_empty());
}

#[tokio::test]
async fn a_token_rotation_that_fails_keeps_the_old_token() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    sweep(
        &rig,
        "rotate token",
        async |rig| rig.create(None).await,
        async |rig, id| {
            rig.manager
                .rotate_token(*id, format!("rotated-{}", SandboxId::new()))
                .await
        },
        async |rig, id, outcome, fault| {
            let st = state::read(&nestbox_agent::sandbox::sandbox_dir(&rig.data, *id)).unwrap();
            assert_eq!(st.rotating_to, None, "a rotation left half recorded");
            match (outcome, fault) {
                (Ok(()), _) => assert!(st.access_token.starts_with("rotated-")),
                (Err(e), Some(_)) => assert!(st.access_token.starts_with("token-"), "{e}"),
                (Err(e), None) => panic!("rotation failed with no fault: {e}"),
            }
            // Either way the manager's client holds the token the guest holds.
            rig.answers(*id).await;
        },
    )
    .await;
}

#[tokio::test]
async fn an_egress_change_that_fails_keeps_the_rules_in_force() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let deny = EgressRules {
        allow_out: Vec::new(),
        deny_out: vec!["0.0.0.0/0".into()],
    };
    sweep(
        &rig,
        "set egress",
        async |rig| rig.create(None).await,
        async |rig, id| rig.manager.set_egress(*id, deny.clone(), 7).await,
        async |rig, id, outcome, fault| {
            let st = state::read(&nestbox_agent::sandbox::sandbox_dir(&rig.data, *id)).unwrap();
            let in_force = rig.fake.egress(st.slot.unwrap()).expect("rules in force");
            match (outcome, fault) {
                (Ok(()), _) => {
                    assert_eq!(st.egress, deny);
                    assert_eq!(st.egress_version, 7);
                    assert_eq!(in_force.rules(), deny);
                }
                (Err(e), Some(_)) => {
                    assert_eq!(st.egress, EgressRules::default(), "{e}");
                    assert_eq!(st.egress_version, 0);
                    assert_eq!(in_force.rules(), EgressRules::default());
                }
                (Err(e), None) => panic!("egress change failed with no fault: {e}"),
            }
            rig.answers(*id).await;
        },
    )
    .await;
}

#[tokio::test]
async fn a_vm_stopped_by_a_full_disk_answers_clearly_and_runs_again_when_space_returns() {
    let rig = Rig::new(Duration::from_secs(300), 0);
    let id = rig.create(None).await;
    rig.fake.set_disk_full(true);
    let h = rig.manager.get(id).unwrap();
    for _ in 0..2000 {
        if h.io_stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = h.guest().expect_err("a stopped guest is not offered");
    assert_eq!(
        err.code(),
        nestbox_types::ErrorCode::InsufficientStorage,
        "{err}"
    );
    assert_eq!(
        h.state(),
        State::Running,
        "it is still the tenant's running sandbox"
    );
    rig.fake.set_disk_full(false);
    for _ in 0..2000 {
        if !h.io_stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.answers(id).await;
    rig.consistent("after the disk had room again");
    rig.empty("done").await;
}

/// Makes the sandbox's state record unwritable (as a full disk does) until dropped.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(rig: &Rig, id: SandboxId) -> Self {
        // The record is written to a temporary file first: a directory in its place fails
        // every write.
        let blocker = nestbox_agent::sandbox::sandbox_dir(&rig.data, id).join("state.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        Unwritable(blocker)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

async fn recorded(rig: &Rig, id: SandboxId, phase: Phase) {
    let dir = nestbox_agent::sandbox::sandbox_dir(&rig.data, id);
    for _ in 0..500 {
        if state::read(&dir).is_some_and(|st| st.phase == phase) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never recorded as {phase:?}");
}

#[tokio::test]
async fn a_change_that_cannot_be_recorded_still_happens_and_is_recorded_later() {
    for hold in [Duration::from_secs(300), Duration::ZERO] {
        let rig = Rig::new(hold, 0);
        let id = rig.create(None).await;
        let h = rig.manager.get(id).unwrap();
        {
            let _full = Unwritable::new(&rig, id);
            // A rotation is recorded before it is made: refused, nothing changes.
            assert!(rig.manager.rotate_token(id, "x".repeat(32)).await.is_err());
            rig.answers(id).await;
            // A pause happens: its record follows.
            rig.manager.pause(id).await.unwrap();
            assert_eq!(h.state(), State::Paused);
            let st = state::read(&nestbox_agent::sandbox::sandbox_dir(&rig.data, id)).unwrap();
            assert_eq!(st.phase, Phase::Running, "the record is behind, not wrong");
        }
        recorded(&rig, id, Phase::Paused).await;
        rig.consistent("a pause recorded late");
        {
            let _full = Unwritable::new(&rig, id);
            if hold.is_zero() {
                // A restore takes a network and a VMM, each recorded before it is taken:
                // refused, it stays paused.
                assert!(rig.manager.resume(id).await.is_err());
                assert_eq!(h.state(), State::Paused);
                rig.consistent("a restore that could not record itself");
            } else {
                // A held VMM runs again: its record follows.
                rig.manager.resume(id).await.unwrap();
                assert_eq!(h.state(), State::Running);
                rig.answers(id).await;
            }
        }
        if hold.is_zero() {
            rig.manager.resume(id).await.unwrap();
            rig.answers(id).await;
        }
        recorded(&rig, id, Phase::Running).await;
        rig.consistent("a resume recorded late");
        rig.empty("done").await;
    }
}

/// A stop (`pause_all`) lets a create and a resume that are under way finish and then
/// pauses what they brought up, and refuses creates and resumes that arrive after it began:
/// nothing comes up (or back) after its pause was decided.
#[tokio::test]
async fn a_stop_waits_for_work_under_way_and_refuses_new_work() {
    let rig = Rig::new(Duration::ZERO, 0);
    let running = rig.create(None).await;
    let resuming = rig.create(None).await;
    rig.manager.pause(resuming).await.unwrap();
    let paused = rig.create(None).await;
    rig.manager.pause(paused).await.unwrap();

    let boot = rig.fake.hold(Step::Boot);
    let restore = rig.fake.hold(Step::Restore);
    let p = rig.params(None);
    let creating = p.id;
    let create = tokio::spawn({
        let m = rig.manager.clone();
        async move { m.create(p).await }
    });
    let resume = tokio::spawn({
        let m = rig.manager.clone();
        async move { m.resume(resuming).await }
    });
    boot.reached().await;
    restore.reached().await;
    let stop = tokio::spawn({
        let m = rig.manager.clone();
        async move { m.pause_all().await }
    });
    while rig.manager.is_open() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    match rig.manager.create(rig.params(None)).await {
        Err(AgentError::NoCapacity(msg)) => assert!(msg.contains("stopping"), "{msg}"),
        other => panic!("a create during a stop was not refused: {other:?}"),
    }
    assert!(matches!(
        rig.manager.resume(paused).await,
        Err(AgentError::NoCapacity(_))
    ));
    assert!(
        !stop.is_finished(),
        "the stop did not wait for work under way"
    );

    boot.open();
    restore.open();
    create
        .await
        .unwrap()
        .expect("the create under way finishes");
    resume
        .await
        .unwrap()
        .expect("the resume under way finishes");
    let (stopped, destroyed) = stop.await.unwrap();
    assert!(destroyed.is_empty(), "{destroyed:?}");
    let stopped: BTreeSet<_> = stopped.into_iter().collect();
    let expected: BTreeSet<_> = [running, resuming, creating].into_iter().collect();
    assert_eq!(stopped, expected);
    for id in [running, resuming, creating, paused] {
        assert_eq!(rig.manager.get(id).unwrap().state(), State::Paused, "{id}");
    }
    rig.consistent("after the stop");
    rig.empty("done").await;
}

/// Copies a directory's files (one level), as a move package's relay would.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
async fn a_moved_sandbox_is_taken_over_whole_or_not_at_all() {
    let source = Rig::new(Duration::ZERO, 0);
    let rig = Rig::new(Duration::from_secs(300), 0);
    let params = |id: SandboxId, export: TemplateId| nestbox_agent::sandbox::AdoptParams {
        id,
        export,
        team: source.team,
        template: "minimal".into(),
        template_id: None,
        timeout_sec: 0,
        egress: EgressRules::default(),
        egress_version: 3,
        // A rotation made while it was paused travels with it.
        access_token: Some(format!("rotated-while-moving-{id}")),
    };
    // A running sandbox is not packed; a paused one is, and asked again, answers the same.
    let id = source.create(None).await;
    let export = TemplateId::new();
    assert!(matches!(
        source.manager.export_sandbox(id, export).await,
        Err(AgentError::WrongState { .. })
    ));
    source.manager.pause(id).await.unwrap();
    let package = source.manager.export_sandbox(id, export).await.unwrap();
    let again = source.manager.export_sandbox(id, export).await.unwrap();
    assert_eq!(package.dir, again.dir);
    assert_eq!(package.record.move_of, Some(id));
    // A package is no template: not listed, not started from, not another sandbox's.
    assert!(
        !source
            .manager
            .template_infos()
            .iter()
            .any(|t| t.template_id == export.to_string())
    );
    let mut from_package = source.params(Some(export));
    from_package.template_id = Some(export);
    assert!(matches!(
        source.manager.create(from_package).await,
        Err(AgentError::TemplateNotFound(_))
    ));
    assert!(matches!(
        source
            .manager
            .export_sandbox(SandboxId::new(), export)
            .await,
        Err(AgentError::Invalid(_))
    ));
    // Packing left the sandbox paused where it is, and it resumes there.
    source.manager.resume(id).await.unwrap();
    source.answers(id).await;
    source.manager.destroy(id).await.unwrap();
    source.manager.delete_template(export).await.unwrap();

    // Taken over and resumed on another host, failing at each step in turn.
    sweep(
        &rig,
        "take over and resume",
        async |rig| {
            let id = source.create(None).await;
            source.manager.pause(id).await.unwrap();
            let export = TemplateId::new();
            let package = source.manager.export_sandbox(id, export).await.unwrap();
            copy_dir(
                &package.dir,
                &rig.data.join("templates").join(export.to_string()),
            );
            source.manager.destroy(id).await.unwrap();
            source.manager.delete_template(export).await.unwrap();
            (id, export)
        },
        async |rig, (id, export)| {
            rig.manager.adopt_sandbox(params(*id, *export)).await?;
            assert_eq!(rig.manager.get(*id).unwrap().state(), State::Paused);
            rig.manager.resume(*id).await
        },
        async |rig, (id, export), outcome, fault| match (outcome, fault) {
            (Ok(()), _) => {
                rig.answers(*id).await;
                let dir = nestbox_agent::sandbox::sandbox_dir(&rig.data, *id);
                let st = state::read(&dir).unwrap();
                assert_eq!(st.egress_version, 3);
                assert_eq!(st.access_token, format!("rotated-while-moving-{id}"));
                assert_eq!(st.rotating_to, None);
                assert!(
                    rig.manager.template(*export).is_err(),
                    "the package is consumed"
                );
            }
            (Err(e), Some(step)) => match rig.manager.get(*id) {
                // Taken over, its resume failed: paused, and it resumes.
                Ok(h) => {
                    assert_eq!(h.state(), State::Paused, "after {step}: {e}");
                    rig.consistent(&format!("resume failed at {step}"));
                    rig.manager.resume(*id).await.expect("a second resume");
                    rig.answers(*id).await;
                }
                // Not taken over: nothing of it here.
                Err(_) => {
                    let dir = nestbox_agent::sandbox::sandbox_dir(&rig.data, *id);
                    assert!(!dir.exists(), "after {step}: {e}: its directory is left");
                    let _ = rig.manager.delete_template(*export).await;
                }
            },
            (Err(e), None) => panic!("take-over failed with no fault: {e}"),
        },
    )
    .await;
    source.empty("source").await;
}
