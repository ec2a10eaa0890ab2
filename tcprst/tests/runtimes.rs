//! Containers made by real runtimes, each test with daemons of its own
//! (their state, sockets and images under a temporary directory): dockerd
//! running a busybox-static image, and containerd running a busybox-static
//! root file system with `ctr run`, in the cgroup the kubelet's cgroupfs
//! driver gives a pod's container. A reset inside each must name the
//! container as its runtime knows it.
//!
//! The systemd cgroup driver's layouts (`docker-<id>.scope`,
//! `kubepods-*.slice`) need systemd, which this host does not run:
//! attribution.rs keeps those as real cgroup directories made by the test.

mod common;

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use common::{Cgroup, Netns, Tracer, cgroup2_root, require_root, send_signal, wait_until};
use serde_json::Value;

/// The test's scratch directory, emptied first and removed by `Scratch`.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcprst-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A root file system of busybox-static, with the applets the tests run.
    fn rootfs(&self) -> PathBuf {
        let rootfs = self.0.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("/bin/busybox from busybox-static (cargo xtask setup installs it)");
        for applet in ["sh", "nc", "sleep"] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        rootfs
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn checked(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn daemon(program: &str, args: &[&str], log: &Path) -> Child {
    require_root();
    let log = fs::File::create(log).unwrap();
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (cargo xtask setup installs it): {e}"))
}

/// A dockerd of this test's own, with the image `IMAGE` imported.
struct Dockerd {
    child: Child,
    socket: PathBuf,
    scratch: Scratch,
}

const IMAGE: &str = "tcprst-busybox:test";

impl Dockerd {
    fn start(test: &str) -> Self {
        let scratch = Scratch::new(&format!("dockerd-{test}"));
        let dir = &scratch.0;
        let socket = dir.join("docker.sock");
        let child = daemon(
            "dockerd",
            &[
                "--iptables=false",
                "--bridge=none",
                "--data-root",
                dir.join("data").to_str().unwrap(),
                "--exec-root",
                dir.join("exec").to_str().unwrap(),
                "--pidfile",
                dir.join("docker.pid").to_str().unwrap(),
                "-H",
                &format!("unix://{}", socket.display()),
            ],
            &dir.join("dockerd.log"),
        );
        let dockerd = Self {
            child,
            socket,
            scratch,
        };
        wait_until("dockerd answering", Duration::from_secs(60), || {
            dockerd.docker_output(&["version"]).status.success()
        });
        let rootfs = dockerd.scratch.rootfs();
        let import = format!(
            "tar -C {} -c . | docker -H unix://{} import - {IMAGE}",
            rootfs.display(),
            dockerd.socket.display()
        );
        checked(
            "docker import",
            Command::new("sh").args(["-c", &import]).output().unwrap(),
        );
        dockerd
    }

    fn docker_output(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap()
    }

    fn docker(&self, args: &[&str]) -> String {
        checked(&format!("docker {args:?}"), self.docker_output(args))
    }

    /// A container named `name` that sleeps, with no network but its own
    /// loopback; returns its id.
    fn run(&self, name: &str) -> String {
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            IMAGE,
            "sleep",
            "3600",
        ])
    }

    /// A connection refused inside container `name`: busybox nc, started
    /// in the container (so in its cgroup), receives the reset.
    fn refused_inside(&self, name: &str, port: u16) {
        // nc fails, as it should: the port is closed.
        let _ = self.docker_output(&["exec", name, "nc", "127.0.0.1", &port.to_string()]);
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    fn signal(&self, signal: i32) {
        send_signal(self.child.id(), signal);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // A test may leave it frozen.
        self.signal(libc::SIGCONT);
        let ids = self.docker_output(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker_output(&["rm", "-f", id]);
        }
        self.signal(libc::SIGTERM);
        common::wait_timeout(&mut self.child, Duration::from_secs(30));
    }
}

fn container_of(v: &Value, id: &str) -> bool {
    v["container"]["id"] == id
}

#[test]
fn a_reset_in_a_docker_container_names_it_and_its_image() {
    let dockerd = Dockerd::start("named");
    let name = format!("web-{}", std::process::id());
    let id = dockerd.run(&name);
    let mut tracer = Tracer::start(&["--docker-socket", dockerd.socket(), "--port", "9"]);
    dockerd.refused_inside(&name, 9);
    let received = tracer.wait_for("the container's reset", |v| {
        v["kind"] == "rst_received" && container_of(v, &id)
    });
    assert_eq!(
        received["container"],
        serde_json::json!({"runtime": "docker", "id": id, "name": name, "image": IMAGE}),
        "{received:#}"
    );
    assert_eq!(received["cgroup"]["path"], format!("/docker/{id}"));
    assert_eq!(received["netns_name"], format!("docker:{}", &id[..12]));
    tracer.stop();
}

/// A container that starts while tracing asks Docker on its first reset:
/// from then on its resets carry its name.
#[test]
fn a_container_started_after_tracing_is_named_once_docker_answers() {
    let dockerd = Dockerd::start("later");
    let name = format!("late-{}", std::process::id());
    let mut tracer = Tracer::start(&["--docker-socket", dockerd.socket()]);
    dockerd.run(&name);
    let pid = dockerd.docker(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let netns = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    // Each reset to a port of its own, to tell them apart.
    let named = (9100..9150).find_map(|port| {
        dockerd.refused_inside(&name, port);
        // Found by its namespace's inode: the first resets may come before
        // tcprst has walked the cgroup tree, or the namespaces, since the
        // container started.
        let reset = tracer.wait_for("the container's reset", |v| {
            v["kind"] == "rst_received" && v["netns"] == netns && v["remote_port"] == port
        });
        (reset["container"]["name"] == name.as_str()).then_some(reset)
    });
    let named = named.expect("no reset of the container named within 50 resets");
    assert_eq!(named["container"]["image"], IMAGE);
    tracer.stop();
}

#[test]
fn container_filter_takes_docker_names() {
    let dockerd = Dockerd::start("filter");
    let (web, db) = (
        format!("web-{}", std::process::id()),
        format!("db-{}", std::process::id()),
    );
    let web_id = dockerd.run(&web);
    let db_id = dockerd.run(&db);
    let mut tracer = Tracer::start(&["--docker-socket", dockerd.socket(), "--container", &web]);
    // The other container's reset first: a filter that let it through
    // would have shown it by the time web's arrives.
    dockerd.refused_inside(&db, 9);
    dockerd.refused_inside(&web, 9);
    tracer.wait_for("web's reset", |v| container_of(v, &web_id));
    let events = tracer.stop();
    assert!(
        events
            .iter()
            .all(|v| v["container"]["name"] == web.as_str()),
        "only {web}'s events, none of {db} ({db_id}): {events:#?}"
    );
}

/// dockerd frozen (SIGSTOP: its socket accepts, nothing answers), then
/// absent: resets of its containers keep their ids, and tcprst says once
/// that Docker is unavailable, however many containers it could not name.
#[test]
fn with_dockerd_stopped_tracing_goes_on_and_says_so_once() {
    let dockerd = Dockerd::start("stopped");
    let pid = std::process::id();
    let names = [format!("one-{pid}"), format!("two-{pid}")];
    let ids: Vec<String> = names.iter().map(|n| dockerd.run(n)).collect();
    // Each container's first process, to reach its namespace without dockerd.
    let pids: Vec<String> = names
        .iter()
        .map(|n| dockerd.docker(&["inspect", "-f", "{{.State.Pid}}", n]))
        .collect();
    dockerd.signal(libc::SIGSTOP);
    let absent = dockerd.scratch.0.join("absent.sock");
    for socket in [dockerd.socket(), absent.to_str().unwrap()] {
        let mut tracer = Tracer::start(&["--docker-socket", socket, "--port", "9"]);
        for (id, pid) in ids.iter().zip(&pids) {
            refused_in_cgroup(&format!("/docker/{id}"), pid, 9);
            let reset = tracer.wait_for("the container's reset", |v| {
                v["kind"] == "rst_received" && container_of(v, id)
            });
            assert_eq!(reset["container"]["runtime"], "docker");
            assert!(reset["container"]["name"].is_null(), "{reset:#}");
            assert!(reset["container"]["image"].is_null(), "{reset:#}");
        }
        let (status, _, stderr) = tracer.stop_with(libc::SIGTERM);
        assert!(status.success(), "{stderr}");
        let said = format!("docker ({socket}) unavailable");
        assert_eq!(stderr.matches(&said).count(), 1, "{stderr}");
    }
}

/// busybox nc connecting to a closed port from cgroup `cgroup` (relative to
/// the cgroup2 root) and the network namespace of process `pid`, as
/// `docker exec` would, without dockerd.
fn refused_in_cgroup(cgroup: &str, pid: &str, port: u16) {
    let procs = cgroup2_root()
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec nsenter -t {pid} -n busybox nc 127.0.0.1 {port}",
        procs.display()
    );
    // nc fails, as it should: the port is closed.
    let _ = Command::new("sh").args(["-c", &script]).output().unwrap();
}

/// A containerd of this test's own.
struct Containerd {
    child: Child,
    address: PathBuf,
    state: PathBuf,
    scratch: Scratch,
}

impl Containerd {
    fn start() -> Self {
        let scratch = Scratch::new("containerd");
        let dir = &scratch.0;
        let (address, state) = (dir.join("containerd.sock"), dir.join("state"));
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                dir.join("root").display(),
                state.display(),
                address.display()
            ),
        )
        .unwrap();
        let child = daemon(
            "containerd",
            &["--config", config.to_str().unwrap()],
            &dir.join("containerd.log"),
        );
        let containerd = Self {
            child,
            address,
            state,
            scratch,
        };
        wait_until("containerd answering", Duration::from_secs(60), || {
            containerd.ctr_output(&["version"]).status.success()
        });
        containerd
    }

    fn ctr_output(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr(&self, args: &[&str]) -> String {
        checked(&format!("ctr {args:?}"), self.ctr_output(args))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let tasks = self.ctr_output(&["task", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
            let _ = self.ctr_output(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr_output(&["task", "delete", "--force", id]);
            let _ = self.ctr_output(&["container", "delete", id]);
        }
        send_signal(self.child.id(), libc::SIGTERM);
        common::wait_timeout(&mut self.child, Duration::from_secs(30));
    }
}

/// A `ctr` container where the kubelet's cgroupfs driver puts a burstable
/// pod's container, with the annotations containerd's CRI plugin writes
/// into its spec: the reset inside carries the pod UID and container id
/// from the cgroup, and the name and image from containerd's bundle.
#[test]
fn a_ctr_container_in_a_kubepods_cgroup_carries_pod_and_container() {
    let pid = std::process::id();
    let pod_uid = format!("7c9e6679-7425-40de-944b-{pid:012x}");
    let id = format!("5f3a9c1e{pid:056x}");
    let pod_path = format!("/kubepods/burstable/pod{pod_uid}");
    // Dropped last: after containerd, so after runc deleted the container.
    let _runc_cgroups = RuncCgroups {
        pod: pod_path.clone(),
        id: id.clone(),
    };
    // The pod's cgroup, which the kubelet makes; runc makes the container's.
    let pod_cgroup = Cgroup::new(&pod_path);
    let containerd = Containerd::start();
    let ns = Netns::new();
    let rootfs = containerd.scratch.rootfs();
    containerd.ctr(&[
        "run",
        "--detach",
        "--cgroup",
        &format!("{}/{id}", pod_cgroup.path),
        "--with-ns",
        &format!("network:/run/netns/{}", ns.name),
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.container-name=web",
        "--annotation",
        "io.kubernetes.cri.image-name=registry.example/shop/web:2.1",
        "--rootfs",
        rootfs.to_str().unwrap(),
        &id,
        "/bin/sleep",
        "3600",
    ]);
    let mut tracer = Tracer::start(&[
        "--netns",
        &ns.name,
        "--containerd-state",
        containerd.state.to_str().unwrap(),
    ]);
    // Exec'd processes join the container's cgroup.
    let _ = containerd.ctr_output(&[
        "task",
        "exec",
        "--exec-id",
        "refused",
        &id,
        "/bin/nc",
        "127.0.0.1",
        "9",
    ]);
    let received = tracer.wait_for("the container's reset", |v| {
        v["kind"] == "rst_received" && container_of(v, &id)
    });
    assert_eq!(
        received["cgroup"]["path"],
        format!("/kubepods/burstable/pod{pod_uid}/{id}")
    );
    assert_eq!(received["pod"]["uid"], pod_uid.as_str());
    assert_eq!(received["pod"]["qos"], "burstable");
    assert_eq!(
        received["container"],
        serde_json::json!({
            "runtime": "containerd",
            "id": id,
            "name": "web",
            "image": "registry.example/shop/web:2.1",
        }),
        "{received:#}"
    );
    tracer.stop();
}

/// The cgroups runc made for a container under a pod's, in every hierarchy
/// of this hybrid host: runc removes the container's own when the task is
/// deleted, and these go when dropped, if nothing else uses them.
struct RuncCgroups {
    pod: String,
    id: String,
}

impl Drop for RuncCgroups {
    fn drop(&mut self) {
        let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for hierarchy in hierarchies.filter_map(Result::ok) {
            let pod = hierarchy.path().join(self.pod.trim_start_matches('/'));
            let mut dirs = vec![pod.join(&self.id)];
            dirs.extend(pod.ancestors().take(3).map(Path::to_path_buf));
            for dir in dirs {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}
