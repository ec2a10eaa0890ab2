//! Container names and images from the runtimes that made the containers:
//! Docker's Engine API, and the OCI bundle containerd writes for each task.
//!
//! A cgroup path gives a container's id and nothing a person knows it by.
//! The runtime knows the rest; asking it costs a round trip, so it is asked
//! once per container, on a task of its own, never by the event loop: a
//! reset of a container not yet known carries its id alone, and the ones
//! after it its name. The answers are kept until the container's cgroup
//! goes away.

use std::{
    collections::{HashMap, HashSet},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::UnixStream, sync::mpsc};

/// Where the runtimes are; the defaults are where they put themselves.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub docker_socket: PathBuf,
    /// containerd's state directory (`state` in its config.toml).
    pub containerd_state: PathBuf,
    /// CRI-O's socket, which also serves its inspect API.
    pub crio_socket: PathBuf,
}

/// What a runtime says about one of its containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    pub runtime: &'static str,
    /// Shared by every event of the container, as the pod watch's names are.
    pub name: Option<Arc<str>>,
    /// The image as it was asked for (`nginx:1.27`), not its digest.
    pub image: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Docker,
    Containerd,
    Crio,
}

/// Who to ask about a container, from the runtime its cgroup path names.
/// A path that names none (the kubelet's cgroupfs driver:
/// `/kubepods/<qos>/pod<uid>/<id>`) is containerd's on most nodes, else
/// Docker's (cri-dockerd). CRI-O and podman are not asked (see README).
fn runtimes_for(cgroup_runtime: Option<&str>) -> &'static [Runtime] {
    match cgroup_runtime {
        Some("docker") => &[Runtime::Docker],
        Some("containerd") => &[Runtime::Containerd],
        Some("cri-o") => &[Runtime::Crio],
        None => &[Runtime::Containerd, Runtime::Docker],
        Some(_) => &[],
    }
}

/// A lookup's outcome.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Some runtime knows it, or every runtime asked said it has no such
    /// container: either way, final for as long as the container lives.
    Known(Option<ContainerMeta>),
    /// A runtime that might know could not be asked: ask again later.
    Unavailable,
}

/// A runtime's answer about one container.
type Found = Result<Option<ContainerMeta>, String>;

/// Requests waiting for the lookup task; past this, a container's next
/// event asks again.
const QUEUED_LOOKUPS: usize = 256;
/// The longest one question to a runtime may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// A runtime that could not be asked is asked again after this long; in
/// between, its containers keep their ids without a round trip each.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(30);
/// An Engine API answer larger than this is not an inspect of one container.
const MAX_ANSWER: usize = 4 << 20;

/// The names the runtimes gave, per container id, and the lookups in flight.
pub struct ContainerNames {
    known: HashMap<String, Option<Arc<ContainerMeta>>>,
    /// One lookup in flight per container, however many resets it sends.
    pending: HashSet<String>,
    requests: mpsc::Sender<(String, &'static [Runtime])>,
    answers: mpsc::UnboundedReceiver<(String, Answer)>,
}

impl ContainerNames {
    /// Starts the lookup task; call from within the tokio runtime.
    pub fn start(opts: RuntimeOptions) -> Self {
        let (requests, queued) = mpsc::channel(QUEUED_LOOKUPS);
        let (answer, answers) = mpsc::unbounded_channel();
        tokio::spawn(serve(opts, queued, answer));
        Self {
            known: HashMap::new(),
            pending: HashSet::new(),
            requests,
            answers,
        }
    }

    /// What the runtime said about the container with this id, if it has
    /// answered; otherwise asks it, at most once at a time, and returns None.
    pub fn get(&mut self, id: &str, cgroup_runtime: Option<&str>) -> Option<Arc<ContainerMeta>> {
        self.take_answers();
        if let Some(known) = self.known.get(id) {
            return known.clone();
        }
        self.ask(id, cgroup_runtime);
        None
    }

    fn ask(&mut self, id: &str, cgroup_runtime: Option<&str>) {
        let runtimes = runtimes_for(cgroup_runtime);
        if runtimes.is_empty() {
            self.known.insert(id.to_owned(), None);
            return;
        }
        if self.pending.contains(id) {
            return;
        }
        // A full queue is a storm of new containers: this one is asked
        // about again on its next event.
        if self.requests.try_send((id.to_owned(), runtimes)).is_ok() {
            self.pending.insert(id.to_owned());
        }
    }

    fn take_answers(&mut self) {
        while let Ok(answer) = self.answers.try_recv() {
            self.answered(answer);
        }
    }

    fn answered(&mut self, (id, answer): (String, Answer)) {
        self.pending.remove(&id);
        if let Answer::Known(meta) = answer {
            self.known.insert(id, meta.map(Arc::new));
        }
    }

    /// Asks about every container in `ids` and waits for the answers, at
    /// most `timeout`: containers running when tracing starts are named
    /// from their first reset.
    pub async fn prefetch<'a>(
        &mut self,
        ids: impl Iterator<Item = (&'a str, Option<&'static str>)>,
        timeout: Duration,
    ) {
        for (id, runtime) in ids {
            self.get(id, runtime);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Ok(Some(answer)) => self.answered(answer),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Forgets the containers whose cgroup is gone.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.known.retain(|id, _| live(id));
    }

    #[cfg(test)]
    fn known_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.known.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }
}

/// A runtime's reachability, so that one that is down is said so once and
/// not asked about every container.
struct Reachability {
    what: String,
    down_until: Option<Instant>,
    warned: bool,
}

impl Reachability {
    fn new(what: String) -> Self {
        Self {
            what,
            down_until: None,
            warned: false,
        }
    }

    fn is_down(&self) -> bool {
        self.down_until.is_some_and(|until| Instant::now() < until)
    }

    fn record(&mut self, found: &Found) {
        match found {
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    log::warn!(
                        "{} unavailable ({e}): its containers keep their ids, without names or images; asking again every {}s",
                        self.what,
                        RETRY_UNAVAILABLE.as_secs()
                    );
                } else {
                    log::debug!("{} still unavailable: {e}", self.what);
                }
                self.down_until = Some(Instant::now() + RETRY_UNAVAILABLE);
            }
            Ok(_) if self.down_until.take().is_some() => {
                log::info!("{} answers again: containers are named", self.what);
            }
            Ok(_) => {}
        }
    }
}

/// The lookup task: one question at a time, so a burst of new containers
/// costs the runtimes one connection at a time.
async fn serve(
    opts: RuntimeOptions,
    mut requests: mpsc::Receiver<(String, &'static [Runtime])>,
    answers: mpsc::UnboundedSender<(String, Answer)>,
) {
    let mut docker = Reachability::new(format!("docker ({})", opts.docker_socket.display()));
    let mut containerd = Reachability::new(format!(
        "containerd's task state ({})",
        tasks_dir(&opts.containerd_state).display()
    ));
    let mut crio = Reachability::new(format!("cri-o ({})", opts.crio_socket.display()));
    while let Some((id, runtimes)) = requests.recv().await {
        let mut answer = Answer::Known(None);
        for runtime in runtimes {
            let reachability = match runtime {
                Runtime::Docker => &mut docker,
                Runtime::Containerd => &mut containerd,
                Runtime::Crio => &mut crio,
            };
            if reachability.is_down() {
                answer = Answer::Unavailable;
                continue;
            }
            let found = match runtime {
                Runtime::Docker => docker_inspect(&opts.docker_socket, &id).await,
                Runtime::Containerd => containerd_bundle(&opts.containerd_state, &id).await,
                Runtime::Crio => crio_inspect(&opts.crio_socket, &id).await,
            };
            reachability.record(&found);
            match found {
                Ok(Some(meta)) => {
                    answer = Answer::Known(Some(meta));
                    break;
                }
                Ok(None) => {}
                Err(_) => answer = Answer::Unavailable,
            }
        }
        if answers.send((id, answer)).is_err() {
            return;
        }
    }
}

/// The part of `GET /containers/{id}/json` that names a container.
#[derive(Deserialize)]
struct DockerInspect {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Config")]
    config: Option<DockerConfig>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(rename = "Image")]
    image: Option<String>,
}

impl DockerInspect {
    fn meta(self) -> ContainerMeta {
        ContainerMeta {
            runtime: "docker",
            // The API names containers with a leading slash.
            name: Some(self.name.trim_start_matches('/'))
                .filter(|n| !n.is_empty())
                .map(Arc::from),
            image: self.config.and_then(|c| c.image).filter(|i| !i.is_empty()),
        }
    }
}

/// Docker's answer about one container: Ok(None) if it has no such
/// container, Err if it could not be asked.
async fn docker_inspect(socket: &Path, id: &str) -> Found {
    inspect(
        socket,
        &format!("/containers/{id}/json"),
        DockerInspect::meta,
    )
    .await
}

/// What CRI-O's inspect API (`GET /containers/{id}` on its own socket)
/// says of a container: the kubelet's name for it in its labels, and the
/// image.
#[derive(Deserialize)]
struct CrioInspect {
    name: String,
    image: Option<String>,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
}

impl CrioInspect {
    fn meta(mut self) -> ContainerMeta {
        // `name` is CRI-O's own (k8s_NAME_POD_NAMESPACE_UID_ATTEMPT); the
        // label is what the pod spec calls the container.
        let name = self
            .labels
            .remove("io.kubernetes.container.name")
            .unwrap_or(self.name);
        ContainerMeta {
            runtime: "cri-o",
            name: Some(name).filter(|n| !n.is_empty()).map(Arc::from),
            image: self.image.filter(|i| !i.is_empty()),
        }
    }
}

/// CRI-O's answer about one container, as `docker_inspect`.
async fn crio_inspect(socket: &Path, id: &str) -> Found {
    inspect(socket, &format!("/containers/{id}"), CrioInspect::meta).await
}

/// Asks a runtime's HTTP API over `socket` about one container, through
/// `path`: Ok(None) if it has no such container (404), Err if it could not
/// be asked or its answer does not parse as `T`.
async fn inspect<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
    meta: fn(T) -> ContainerMeta,
) -> Found {
    match tokio::time::timeout(LOOKUP_TIMEOUT, unix_get(socket, path)).await {
        Err(_) => Err(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(e),
        Ok(Ok((StatusCode::NOT_FOUND, _))) => Ok(None),
        Ok(Ok((StatusCode::OK, body))) => serde_json::from_slice::<T>(&body)
            .map(|inspect| Some(meta(inspect)))
            .map_err(|e| format!("an inspect it answered does not parse: {e}")),
        Ok(Ok((status, _))) => Err(format!("it answered {status} to an inspect")),
    }
}

/// One GET over a unix socket, on a connection of its own.
async fn unix_get(socket: &Path, path: &str) -> Result<(StatusCode, Bytes), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let request = Request::get(path)
        // HTTP/1.1 needs a Host; the daemons ignore it.
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    // The connection is driven while the exchange runs, and dropped with it.
    tokio::select! {
        exchanged = exchange => exchanged,
        ended = connection => Err(match ended {
            Ok(()) => "it closed the connection without answering".to_owned(),
            Err(e) => e.to_string(),
        }),
    }
}

/// Where containerd's runc shims keep each task's OCI bundle, one directory
/// per containerd namespace (`k8s.io` for the kubelet's, `moby` for
/// Docker's, `default` for ctr's).
fn tasks_dir(state: &Path) -> PathBuf {
    state.join("io.containerd.runtime.v2.task")
}

/// The annotations of an OCI runtime spec (a bundle's config.json).
#[derive(Deserialize)]
struct OciSpec {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// What containerd's CRI plugin writes into every container's spec.
const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// containerd's answer about one container, from the bundle of its task:
/// Ok(None) if no namespace has a task of that id (or only Docker's, whose
/// names Docker keeps), Err if containerd's state cannot be read at all.
async fn containerd_bundle(state: &Path, id: &str) -> Found {
    let tasks = tasks_dir(state);
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || read_bundle(&tasks, &id))
        .await
        .map_err(|e| e.to_string())?
}

fn read_bundle(tasks: &Path, id: &str) -> Found {
    let namespaces = std::fs::read_dir(tasks).map_err(|e| e.to_string())?;
    for namespace in namespaces.filter_map(Result::ok) {
        if namespace.file_name() == "moby" {
            continue;
        }
        let config = namespace.path().join(id).join("config.json");
        let text = match std::fs::read(&config) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", config.display())),
        };
        let spec: OciSpec =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", config.display()))?;
        let annotation = |key| spec.annotations.get(key).filter(|v| !v.is_empty()).cloned();
        return Ok(Some(ContainerMeta {
            runtime: "containerd",
            name: annotation(CRI_CONTAINER_NAME).map(Arc::from),
            image: annotation(CRI_IMAGE_NAME),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0e7859b44b4e93d620108bda2c5103614fd6ff83a2798742f0ddd3fa3db3b3b7";

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tcprst-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn docker_names_lose_their_slash() {
        let inspect: DockerInspect = serde_json::from_str(
            r#"{"Id":"x","Name":"/shop-web-1","Image":"sha256:ad4b","Config":{"Image":"nginx:1.27","Labels":{}}}"#,
        )
        .unwrap();
        assert_eq!(
            inspect.meta(),
            ContainerMeta {
                runtime: "docker",
                name: Some("shop-web-1".into()),
                image: Some("nginx:1.27".into()),
            }
        );
    }

    #[test]
    fn which_runtime_is_asked() {
        assert_eq!(runtimes_for(Some("docker")), &[Runtime::Docker]);
        assert_eq!(runtimes_for(Some("containerd")), &[Runtime::Containerd]);
        assert_eq!(runtimes_for(None), &[Runtime::Containerd, Runtime::Docker]);
        assert_eq!(runtimes_for(Some("cri-o")), &[Runtime::Crio]);
        assert!(runtimes_for(Some("podman")).is_empty());
    }

    #[test]
    fn bundles_give_the_cri_names_and_skip_dockers() {
        let state = temp_dir("bundles");
        let tasks = tasks_dir(&state);
        let write = |namespace: &str, id: &str, spec: &str| {
            let dir = tasks.join(namespace).join(id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), spec).unwrap();
        };
        write(
            "k8s.io",
            ID,
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-name":"web","io.kubernetes.cri.image-name":"nginx:1.27","io.kubernetes.cri.sandbox-name":"web-1"}}"#,
        );
        write("default", "plain", r#"{"ociVersion":"1.0.2"}"#);
        write("moby", "dockers", r#"{"annotations":{}}"#);
        assert_eq!(
            read_bundle(&tasks, ID),
            Ok(Some(ContainerMeta {
                runtime: "containerd",
                name: Some("web".into()),
                image: Some("nginx:1.27".into()),
            }))
        );
        assert_eq!(
            read_bundle(&tasks, "plain"),
            Ok(Some(ContainerMeta {
                runtime: "containerd",
                name: None,
                image: None,
            }))
        );
        assert_eq!(read_bundle(&tasks, "dockers"), Ok(None));
        assert_eq!(read_bundle(&tasks, "absent"), Ok(None));
        write("k8s.io", "broken", "{");
        assert!(read_bundle(&tasks, "broken").is_err());
        std::fs::remove_dir_all(&state).unwrap();
        assert!(read_bundle(&tasks, ID).is_err(), "no state directory");
    }

    /// Lookups against a containerd state directory and a Docker socket
    /// that does not exist: one question per container, however often it
    /// is asked about, and an unreachable runtime is not cached as final.
    #[tokio::test]
    async fn one_lookup_per_container_and_unavailable_is_asked_again() {
        let state = temp_dir("names");
        let bundle = tasks_dir(&state).join("k8s.io").join(ID);
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-name":"web"}}"#,
        )
        .unwrap();
        let mut names = ContainerNames::start(RuntimeOptions {
            docker_socket: state.join("no-docker.sock"),
            containerd_state: state.clone(),
            crio_socket: state.join("no-crio.sock"),
        });
        assert_eq!(names.get(ID, Some("containerd")), None, "not asked yet");
        assert_eq!(names.get(ID, Some("containerd")), None);
        assert_eq!(names.pending.len(), 1, "one lookup in flight");
        let dockers = "d0c4e7".repeat(10) + "d0c4";
        names
            .prefetch(
                [(ID, Some("containerd")), (dockers.as_str(), Some("docker"))].into_iter(),
                Duration::from_secs(10),
            )
            .await;
        assert!(names.pending.is_empty());
        assert_eq!(
            names.get(ID, Some("containerd")).unwrap().name.as_deref(),
            Some("web")
        );
        assert_eq!(names.known_ids(), vec![ID], "docker was unreachable");
        assert_eq!(names.get("podman-id", Some("podman")), None);
        assert_eq!(names.known_ids(), vec![ID, "podman-id"], "not asked: final");
        names.retain(|id| id != ID);
        assert_eq!(names.known_ids(), vec!["podman-id"]);
        std::fs::remove_dir_all(&state).unwrap();
    }

    /// CRI-O's inspect API over a unix socket, served here in the shape
    /// CRI-O's `ContainerInfo` has (no CRI-O package exists for this
    /// machine to run the real one): the pod spec's name from the labels,
    /// the image, and 404 for a container it does not have.
    #[tokio::test]
    async fn crio_names_come_from_its_inspect_api() {
        use http_body_util::Full;
        use hyper::{Response, body::Incoming, service::service_fn};

        let dir = temp_dir("crio");
        let socket = dir.join("crio.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let serve = service_fn(|req: Request<Incoming>| async move {
                    let body = (req.uri().path() == format!("/containers/{ID}"))
                        .then_some(r#"{"name":"k8s_web_shop-7d9_default_1f2e_0","pid":4242,"image":"docker.io/library/nginx:1.27","image_ref":"sha256:ad4b","created_time":1,"labels":{"io.kubernetes.container.name":"web","io.kubernetes.pod.name":"shop-7d9"},"annotations":{},"crio_annotations":{},"log_path":"","root":"","sandbox":"","ip_addresses":["10.88.0.5"]}"#);
                    let status = if body.is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body.unwrap_or_default())))
                            .unwrap(),
                    )
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), serve),
                );
            }
        });
        assert_eq!(
            crio_inspect(&socket, ID).await,
            Ok(Some(ContainerMeta {
                runtime: "cri-o",
                name: Some("web".into()),
                image: Some("docker.io/library/nginx:1.27".into()),
            }))
        );
        assert_eq!(crio_inspect(&socket, "absent").await, Ok(None));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(crio_inspect(&socket, ID).await.is_err(), "no socket");
    }
}
