//! Kubernetes enrichment: turns the pod UID and container id that tcprst derives from a socket's
//! cgroup into the pod's namespace, name, labels and container name, by watching this node's pods.
//! Without the API, events keep the cgroup-derived ids; enrichment is best effort.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::errors::one_line;

/// Set on mirror pods, the API's copies of static pods: the value is the UID the kubelet gave the
/// static pod, which is what its cgroup path carries, while the mirror's own metadata.uid is
/// never seen on the node.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What an event needs to know about a pod. Events share it (`Arc`): a
/// storm from one pod must not copy its labels and containers per reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Only the labels events carry (`--pod-labels`): pods can have many.
    pub labels: BTreeMap<String, String>,
    /// Container id (hex, without the "containerd://", "cri-o://", "docker://" scheme) ->
    /// container name, for regular, init and ephemeral containers.
    pub containers: HashMap<String, Arc<str>>,
}

impl PodMeta {
    fn from_pod(pod: &Pod, wanted_labels: &[String]) -> Self {
        let meta = &pod.metadata;
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            labels: meta
                .labels
                .iter()
                .flatten()
                .filter(|(key, _)| wanted_labels.contains(key))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            containers: pod
                .status
                .iter()
                .flat_map(|status| {
                    [
                        &status.init_container_statuses,
                        &status.container_statuses,
                        &status.ephemeral_container_statuses,
                    ]
                })
                .flatten()
                .flatten()
                .flat_map(container_ids)
                .collect(),
        }
    }
}

/// A container's current id and, after a restart, the previous one: sockets of a crashed
/// instance are often reset just as the status moves on to its successor.
fn container_ids(status: &ContainerStatus) -> impl Iterator<Item = (String, Arc<str>)> + '_ {
    let previous = status
        .last_state
        .as_ref()
        .and_then(|state| state.terminated.as_ref())
        .and_then(|terminated| terminated.container_id.as_deref());
    [status.container_id.as_deref(), previous]
        .into_iter()
        .flatten()
        .filter_map(bare_container_id)
        .map(|id| (id.to_owned(), Arc::from(status.name.as_str())))
}

/// "containerd://<hex>" -> "<hex>"; None for the empty id of a container that has not started.
fn bare_container_id(id: &str) -> Option<&str> {
    let id = id.split_once("://").map_or(id, |(_, id)| id);
    (!id.is_empty()).then_some(id)
}

/// The UID under which the kubelet places the pod's cgroup, i.e. what events will ask for.
fn cgroup_uid(pod: &Pod) -> Option<&str> {
    let meta = &pod.metadata;
    meta.annotations
        .as_ref()
        .and_then(|annotations| annotations.get(MIRROR_ANNOTATION))
        .or(meta.uid.as_ref())
        .map(String::as_str)
}

/// The systemd cgroup driver spells UIDs with '_' instead of '-'; accept both.
fn api_uid(uid: &str) -> Cow<'_, str> {
    if uid.contains('_') {
        Cow::Owned(uid.replace('_', "-"))
    } else {
        Cow::Borrowed(uid)
    }
}

type Pods = HashMap<String, Arc<PodMeta>>;

/// Pods on this node by the UID their cgroup paths carry; cheap to clone and share, kept
/// current by [`watch_pods`].
#[derive(Clone)]
pub struct PodIndex {
    pods: Arc<RwLock<Pods>>,
    /// The labels kept of each pod, all others dropped as the pod is stored.
    wanted_labels: Arc<[String]>,
}

impl PodIndex {
    pub fn new(wanted_labels: Vec<String>) -> Self {
        Self {
            pods: Arc::default(),
            wanted_labels: wanted_labels.into(),
        }
    }

    pub fn get(&self, pod_uid: &str) -> Option<Arc<PodMeta>> {
        self.read().get(api_uid(pod_uid).as_ref()).cloned()
    }

    /// Accepts the container id with or without its runtime scheme.
    pub fn container_name(&self, pod_uid: &str, container_id: &str) -> Option<Arc<str>> {
        let id = bare_container_id(container_id)?;
        self.read()
            .get(api_uid(pod_uid).as_ref())?
            .containers
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether pod `namespace`/`name` is on this node now.
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .values()
            .any(|p| p.namespace == namespace && p.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic elsewhere cannot leave the map half-updated (every write is a single insert,
    // remove or swap), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Pods> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Pods> {
        self.pods.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A (re-)list is collected in `relist` and swapped in whole at InitDone, so lookups keep
    /// answering meanwhile and pods deleted while the watch was down disappear.
    fn apply(&self, event: watcher::Event<Pod>, relist: &mut Option<Pods>) {
        let entry = |pod: &Pod| {
            let uid = cgroup_uid(pod)?.to_owned();
            Some((uid, Arc::new(PodMeta::from_pod(pod, &self.wanted_labels))))
        };
        match event {
            watcher::Event::Init => *relist = Some(Pods::new()),
            watcher::Event::InitApply(pod) => relist.get_or_insert_default().extend(entry(&pod)),
            watcher::Event::InitDone => *self.write() = relist.take().unwrap_or_default(),
            watcher::Event::Apply(pod) => self.write().extend(entry(&pod)),
            watcher::Event::Delete(pod) => {
                if let Some(uid) = cgroup_uid(&pod) {
                    self.write().remove(uid);
                }
            }
        }
    }
}

/// The node this runs on: env NODE_NAME, else the hostname. Set NODE_NAME from the downward API
/// (spec.nodeName): without hostNetwork a pod's hostname is the pod's name, and even with it
/// the hostname need not equal the node name.
pub fn node_name() -> String {
    pick_node_name(std::env::var("NODE_NAME").ok(), || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
    })
}

fn pick_node_name(
    from_env: Option<String>,
    hostname: impl FnOnce() -> std::io::Result<String>,
) -> String {
    match from_env.filter(|name| !name.trim().is_empty()) {
        Some(name) => name.trim().to_owned(),
        None => hostname().map_or_else(
            |err| {
                log::warn!("cannot read the hostname for the node name: {err}; set NODE_NAME");
                "unknown".to_owned()
            },
            |name| name.trim().to_owned(),
        ),
    }
}

/// The client config: from `kubeconfig` if given, else in-cluster when KUBERNETES_SERVICE_HOST
/// is set, else None (not on Kubernetes).
pub async fn client_config(kubeconfig: Option<&Path>) -> anyhow::Result<Option<kube::Config>> {
    if let Some(path) = kubeconfig {
        let context = || format!("loading kubeconfig {}", path.display());
        let file = Kubeconfig::read_from(path).with_context(context)?;
        let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(context)?;
        return Ok(Some(config));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Ok(None);
    }
    kube::Config::incluster()
        .map(Some)
        .context("loading the in-cluster Kubernetes config")
}

/// Watches the pods on `node`, keeping `index` current. Runs until the process ends: the
/// watcher re-lists and resumes by itself, and API errors are retried with backoff after one
/// warning.
pub async fn watch_pods(config: kube::Config, node: String, index: PodIndex) {
    let client = match kube::Client::try_from(config) {
        Ok(client) => client,
        Err(err) => {
            let err = one_line(&err);
            log::warn!("Kubernetes client setup failed: {err}; events keep cgroup-derived ids");
            return;
        }
    };
    let pods = kube::Api::<Pod>::all(client);
    let selector = format!("spec.nodeName={node}");
    // Every node runs one watcher: let the apiserver answer (re-)lists from its cache
    // (resourceVersion=0), as kubelets and client-go informers do, instead of from etcd. kube
    // drops resourceVersion=0 from paginated lists, and one node's pods need no pages anyway.
    let config = watcher::Config {
        page_size: None,
        ..watcher::Config::default().fields(&selector).any_semantic()
    };
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut relist = None;
    let mut outage = Outage::default();
    let mut checked_node = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if outage.recovered_by(&event) {
                    log::info!("Kubernetes API reachable again; watching pods on node {node}");
                }
                let listed = matches!(event, watcher::Event::InitDone);
                index.apply(event, &mut relist);
                // A node always runs some pods (tcprst's own, kube-proxy, the CNI's), so none
                // means the name is wrong, typically a hostname that is not the node name.
                if listed && !std::mem::replace(&mut checked_node, true) && index.is_empty() {
                    log::warn!(
                        "Kubernetes lists no pods on node {node}; set NODE_NAME if that is not this node"
                    );
                }
            }
            Err(err) => log::log!(
                outage.error_level(),
                "Kubernetes API unreachable: {}; events keep cgroup-derived ids",
                one_line(&err)
            ),
        }
    }
}

/// Tells the user about an API outage once, not on every retry.
#[derive(Default, PartialEq)]
enum Outage {
    #[default]
    NotSeen,
    Warned,
    /// Recovered after the warning; later outages stay quiet as the user already knows.
    Recovered,
}

impl Outage {
    fn error_level(&mut self) -> log::Level {
        if *self == Self::NotSeen {
            *self = Self::Warned;
            log::Level::Warn
        } else {
            log::Level::Debug
        }
    }

    /// True once: for the first event after the warning that needed the API to answer.
    fn recovered_by<K>(&mut self, event: &watcher::Event<K>) -> bool {
        // The watcher announces Init before it even tries to list.
        let recovered = *self == Self::Warned && !matches!(event, watcher::Event::Init);
        if recovered {
            *self = Self::Recovered;
        }
        recovered
    }
}

#[cfg(test)]
mod tests;
