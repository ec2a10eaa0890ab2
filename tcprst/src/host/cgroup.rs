//! cgroup id → cgroup path → container, pod and service.
//!
//! The kernel names a socket's cgroup by id, which is the inode number of
//! the cgroup's directory in the cgroup2 filesystem; container runtimes and
//! the kubelet name those directories in a few well-known ways.

use crate::mountinfo::mount_point;
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// What a cgroup path says about who runs in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Relative to the cgroup2 root, starting with `/`.
    pub path: String,
    pub runtime: Option<&'static str>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Kubernetes QoS class: guaranteed, burstable or besteffort.
    pub qos: Option<&'static str>,
    /// The systemd service of a host process.
    pub service: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn qos(s: &str) -> Option<&'static str> {
    match s {
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    }
}

/// Container scopes as the systemd cgroup driver names them; the
/// `*-conmon-*` monitors are not containers.
const SCOPES: [(&str, &str); 4] = [
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
];

/// A pod slice: `kubepods-burstable-pod<uid with _>.slice`,
/// `kubepods-pod<uid>.slice` (guaranteed), or cgroupfs `pod<uid>`.
fn pod_of(component: &str, parent: Option<&str>) -> Option<(String, &'static str)> {
    if let Some(rest) = component.strip_prefix("kubepods-")
        && let Some(rest) = rest.strip_suffix(".slice")
    {
        let (class, uid) = match rest.split_once("-pod") {
            Some((class, uid)) => (qos(class)?, uid),
            None => ("guaranteed", rest.strip_prefix("pod")?),
        };
        return Some((uid.replace('_', "-"), class));
    }
    let uid = component.strip_prefix("pod")?;
    if uid.len() != 36 {
        return None;
    }
    let class = parent.and_then(qos).unwrap_or("guaranteed");
    Some((uid.to_owned(), class))
}

/// How a table names a container: `runtime:name`, or while its runtime has
/// not said the name, `runtime:` and the first 12 characters of its id, as
/// `docker ps` shows it.
pub(crate) fn container_label(runtime: Option<&str>, name: Option<&str>, id: &str) -> String {
    let runtime = runtime.unwrap_or("container");
    match name {
        Some(name) => format!("{runtime}:{name}"),
        None => format!("{runtime}:{}", &id[..12]),
    }
}

pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo {
        path: path.to_owned(),
        ..Default::default()
    };
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let in_kubepods = components
        .iter()
        .any(|c| *c == "kubepods" || c.starts_with("kubepods"));
    for (i, component) in components.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| components[p]);
        if let Some((uid, class)) = pod_of(component, parent) {
            info.pod_uid = Some(uid);
            info.qos = Some(class);
            continue;
        }
        let scope = component.strip_suffix(".scope").unwrap_or(component);
        if let Some((runtime, id)) = SCOPES
            .iter()
            .find_map(|(prefix, runtime)| Some((*runtime, scope.strip_prefix(prefix)?)))
            && is_container_id(id)
        {
            info.runtime = Some(runtime);
            info.container_id = Some(id.to_owned());
            continue;
        }
        if is_container_id(component) {
            // cgroupfs driver: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>.
            info.container_id = Some((*component).to_owned());
            info.runtime = (parent == Some("docker")).then_some("docker");
            continue;
        }
        if let Some(service) = component.strip_suffix(".service")
            && !in_kubepods
        {
            info.service = Some(service.to_owned());
        }
    }
    info
}

/// Rescans of the cgroup tree for an unknown id happen at most this often,
/// so a stream of resets from an unknown cgroup does not walk it each time.
/// Between them, an unknown id is asked of the kernel alone (`by_handle`).
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// The file handle type of a kernfs node, which cgroup2's directories are
/// (include/linux/exportfs.h).
const FILEID_KERNFS: i32 = 0xfe;

/// A kernfs file handle: the node's id, which for a cgroup is its id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

pub(crate) struct CgroupResolver {
    root: Option<PathBuf>,
    by_id: HashMap<u64, Arc<CgroupInfo>>,
    scanned_at: Option<Instant>,
    /// How many times the tree was walked: what was learnt about the
    /// containers in it is checked against it after each walk.
    scans: u64,
    /// Ids asked by handle since the last walk: each is asked once, so a
    /// storm from a cgroup already gone costs a lookup, not one a reset.
    asked: HashSet<u64>,
}

impl CgroupResolver {
    /// Uses the cgroup2 mount of this host.
    pub(crate) fn discover() -> Self {
        let root = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| mount_point(&m, "cgroup2"));
        if root.is_none() {
            log::warn!("no cgroup2 filesystem mounted: containers and pods will not be named");
        }
        Self::at(root)
    }

    pub(crate) fn at(root: Option<PathBuf>) -> Self {
        Self {
            root,
            by_id: HashMap::new(),
            scanned_at: None,
            scans: 0,
            asked: HashSet::new(),
        }
    }

    /// Walks the tree now, whenever it was last walked.
    pub(crate) fn rescan(&mut self) {
        if let Some(root) = self.root.clone() {
            self.scan(&root);
        }
    }

    pub(crate) fn scans(&self) -> u64 {
        self.scans
    }

    /// The containers in the tree as of the last walk.
    pub(crate) fn containers(&self) -> impl Iterator<Item = &CgroupInfo> {
        self.by_id
            .values()
            .filter(|info| info.container_id.is_some())
            .map(|info| &**info)
    }

    pub(crate) fn resolve(&mut self, id: u64) -> Option<Arc<CgroupInfo>> {
        if let Some(info) = self.by_id.get(&id) {
            return Some(info.clone());
        }
        let root = self.root.clone()?;
        let due = self
            .scanned_at
            .is_none_or(|at| at.elapsed() >= RESCAN_EVERY);
        if due {
            self.scan(&root);
        } else if self.asked.insert(id)
            && let Some(path) = by_handle(&root, id)
        {
            // A container made since the last walk, named from its first
            // reset rather than from the first after the next walk.
            self.by_id.insert(id, Arc::new(parse_path(&path)));
        }
        self.by_id.get(&id).cloned()
    }

    /// Rebuilds the map from the tree as it is now, keeping what it already
    /// parsed: cgroups that went away leave with the scan, so the map is
    /// bounded by the live tree, however many containers came and went.
    fn scan(&mut self, root: &Path) {
        self.scanned_at = Some(Instant::now());
        self.scans += 1;
        self.asked.clear();
        let mut known = std::mem::take(&mut self.by_id);
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let relative = dir.strip_prefix(root).unwrap_or(&dir);
            let path = format!("/{}", relative.display());
            let info = known
                .remove(&meta.ino())
                .filter(|info| info.path == path)
                .unwrap_or_else(|| Arc::new(parse_path(&path)));
            self.by_id.insert(meta.ino(), info);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// The path of cgroup `id` under `root`, the cgroup2 mount, starting with
/// `/`: the kernel opens a cgroup's directory from its id as a file handle,
/// without a walk of the tree. It needs CAP_DAC_READ_SEARCH, which tracing
/// as root has; None without it, or once the cgroup is gone.
fn by_handle(root: &Path, id: u64) -> Option<String> {
    let mount = fs::File::open(root).ok()?;
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a file_handle header followed by its 8 bytes of
    // handle, as handle_bytes says, and lives across the call; `mount` is
    // an open descriptor.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: open_by_handle_at returned a new descriptor that nothing
    // else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let target = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    // A directory removed since reads "… (deleted)"; nothing to name then.
    let relative = target.strip_prefix(root).ok()?.to_str()?;
    (!relative.ends_with(" (deleted)")).then(|| format!("/{relative}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0e7859b44b4e93d620108bda2c5103614fd6ff83a2798742f0ddd3fa3db3b3b7";
    const UID: &str = "2e7a1c5d-8f0b-4c3a-9d6e-1f2a3b4c5d6e";

    fn uid_underscored() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn docker_and_podman_scopes() {
        let docker = parse_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(docker.runtime, Some("docker"));
        assert_eq!(docker.container_id.as_deref(), Some(ID));
        assert_eq!(docker.pod_uid, None);
        let podman = parse_path(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(podman.runtime, Some("podman"));
        assert_eq!(podman.container_id.as_deref(), Some(ID));
        let conmon = parse_path(&format!("/machine.slice/libpod-conmon-{ID}.scope"));
        assert_eq!(conmon.container_id, None);
    }

    #[test]
    fn kubernetes_systemd_slices() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid_underscored()
        );
        let info = parse_path(&path);
        assert_eq!(info.runtime, Some("containerd"));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.pod_uid.as_deref(), Some(UID));
        assert_eq!(info.qos, Some("burstable"));
        let crio = parse_path(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
            uid_underscored()
        ));
        assert_eq!(
            (crio.runtime, crio.qos),
            (Some("cri-o"), Some("besteffort"))
        );
        let guaranteed = parse_path(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            uid_underscored()
        ));
        assert_eq!(guaranteed.qos, Some("guaranteed"));
        assert_eq!(guaranteed.pod_uid.as_deref(), Some(UID));
        let conmon = parse_path(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope",
            uid_underscored()
        ));
        assert_eq!(conmon.container_id, None);
        assert_eq!(conmon.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let docker = parse_path(&format!("/docker/{ID}"));
        assert_eq!(
            (docker.runtime, docker.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        let kube = parse_path(&format!("/kubepods/burstable/pod{UID}/{ID}"));
        assert_eq!(kube.pod_uid.as_deref(), Some(UID));
        assert_eq!(kube.qos, Some("burstable"));
        assert_eq!(kube.container_id.as_deref(), Some(ID));
        assert_eq!(kube.runtime, None);
        let guaranteed = parse_path(&format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(guaranteed.qos, Some("guaranteed"));
    }

    #[test]
    fn host_services_and_nothing_known() {
        let svc = parse_path("/system.slice/nginx.service");
        assert_eq!(svc.service.as_deref(), Some("nginx"));
        assert_eq!(svc.container_id, None);
        let user = parse_path("/user.slice/user-1000.slice/session-2.scope");
        assert_eq!(
            user,
            CgroupInfo {
                path: user.path.clone(),
                ..Default::default()
            }
        );
        // Not 64 hex digits: not a container id.
        assert_eq!(
            parse_path("/system.slice/docker-abc.scope").container_id,
            None
        );
        assert_eq!(parse_path("/").path, "/");
    }

    #[test]
    fn resolves_ids_by_directory_inode() {
        let root = std::env::temp_dir().join(format!("tcprst-cgroup-ut-{}", std::process::id()));
        let scope = root.join(format!("system.slice/docker-{ID}.scope"));
        fs::create_dir_all(&scope).unwrap();
        let id = fs::metadata(&scope).unwrap().ino();
        let mut resolver = CgroupResolver::at(Some(root.clone()));
        let info = resolver.resolve(id).unwrap();
        assert_eq!(info.path, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(info.runtime, Some("docker"));
        assert!(resolver.resolve(u64::MAX).is_none());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rescan_forgets_cgroups_that_went_away() {
        let root = std::env::temp_dir().join(format!("tcprst-cgroup-gone-{}", std::process::id()));
        let (kept, gone) = (root.join("kept.scope"), root.join("gone.scope"));
        fs::create_dir_all(&kept).unwrap();
        fs::create_dir_all(&gone).unwrap();
        let (kept_id, gone_id) = (
            fs::metadata(&kept).unwrap().ino(),
            fs::metadata(&gone).unwrap().ino(),
        );
        let mut resolver = CgroupResolver::at(Some(root.clone()));
        assert!(resolver.resolve(gone_id).is_some());
        fs::remove_dir(&gone).unwrap();
        resolver.scan(&root);
        assert!(!resolver.by_id.contains_key(&gone_id));
        assert_eq!(resolver.by_id[&kept_id].path, "/kept.scope");
        assert_eq!(resolver.by_id.len(), 2, "the root and kept.scope");
        fs::remove_dir_all(&root).unwrap();
    }
}
