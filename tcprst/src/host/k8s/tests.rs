//! The pod watch against a fake API server (real HTTP: list, watch and
//! bookmarks), and the pod index it keeps.

use super::*;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use futures::channel::mpsc;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::List;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, WatchEvent};

const NODE: &str = "node-a";
const HEX_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HEX_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const HEX_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const HEX_D: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
const HEX_E: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
const WEB_UID: &str = "0b3ad2a4-7a43-4c4e-9e0e-2f1c0c6b1a11";
const LIST_VERSION: &str = "10";
const BOOKMARK_VERSION: &str = "20";

fn pod(name: &str, uid: &str, node: &str, version: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus::default()),
    }
}

fn container(name: &str, id: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        container_id: Some(id.into()),
        ..ContainerStatus::default()
    }
}

fn status(pod: &mut Pod) -> &mut PodStatus {
    pod.status.get_or_insert_default()
}

fn web_pod(version: &str) -> Pod {
    let mut pod = pod("web-0", WEB_UID, NODE, version);
    pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
    let status = status(&mut pod);
    status.init_container_statuses = Some(vec![container("migrate", &format!("cri-o://{HEX_A}"))]);
    status.container_statuses = Some(vec![
        container("web", &format!("containerd://{HEX_B}")),
        // Created but not started: no id yet.
        container("sidecar", ""),
    ]);
    pod
}

/// Minimal apiserver for GET /api/v1/pods: LIST answers `pods` (filtered by the field
/// selector like the real one); each WATCH streams the next queued channel's events, then
/// a BOOKMARK if the client allowed bookmarks, as the apiserver does before closing a watch.
struct FakeApi {
    pods: Vec<Pod>,
    watches: Mutex<VecDeque<mpsc::UnboundedReceiver<WatchEvent<Pod>>>>,
    requests: Mutex<Vec<HashMap<String, String>>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl FakeApi {
    fn respond(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.uri().path() != "/api/v1/pods" {
            let mut response = Response::new(Full::default().boxed_unsync());
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        }
        let query = parse_query(req.uri().query().unwrap_or_default());
        self.requests.lock().unwrap().push(query.clone());
        let body = if query.get("watch").is_some_and(|w| w == "true") {
            self.watch(query.contains_key("allowWatchBookmarks"))
        } else {
            self.list(query.get("fieldSelector").map(String::as_str))
        };
        Response::new(body)
    }

    fn list(&self, selector: Option<&str>) -> Body {
        let node = selector.map(|s| s.strip_prefix("spec.nodeName=").expect("selector"));
        let items = self.pods.iter().filter(|pod| {
            node.is_none_or(|node| pod.spec.as_ref().unwrap().node_name.as_deref() == Some(node))
        });
        let list = List {
            items: items.cloned().collect(),
            metadata: ListMeta {
                resource_version: Some(LIST_VERSION.into()),
                ..ListMeta::default()
            },
        };
        Full::new(Bytes::from(serde_json::to_vec(&list).unwrap())).boxed_unsync()
    }

    fn watch(&self, bookmarks: bool) -> Body {
        let bookmark = bookmarks.then(|| WatchEvent::Bookmark {
            annotations: BTreeMap::new(),
            resource_version: BOOKMARK_VERSION.into(),
        });
        // Later watches than the test planned for stay open and silent.
        let events = match self.watches.lock().unwrap().pop_front() {
            Some(events) => events.chain(futures::stream::iter(bookmark)).boxed(),
            None => futures::stream::pending().boxed(),
        };
        StreamBody::new(events.map(|event| Ok(Frame::data(watch_line(&event))))).boxed_unsync()
    }

    fn requests(&self) -> Vec<HashMap<String, String>> {
        self.requests.lock().unwrap().clone()
    }
}

/// One line of a watch response. k8s-openapi serializes a bookmark's object without
/// apiVersion and kind, which the apiserver does send and kube's decoder requires.
fn watch_line(event: &WatchEvent<Pod>) -> Bytes {
    let mut json = serde_json::to_value(event).unwrap();
    if let WatchEvent::Bookmark { .. } = event {
        let object = json["object"].as_object_mut().unwrap();
        object.insert("apiVersion".into(), "v1".into());
        object.insert("kind".into(), "Pod".into());
    }
    let mut line = serde_json::to_vec(&json).unwrap();
    line.push(b'\n');
    line.into()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (percent_decode(key), percent_decode(value)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let mut bytes = s.bytes();
    let mut out = Vec::new();
    while let Some(byte) = bytes.next() {
        out.push(match byte {
            b'%' => {
                let hex = [bytes.next().unwrap(), bytes.next().unwrap()];
                u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap()
            }
            b'+' => b' ',
            byte => byte,
        });
    }
    String::from_utf8(out).unwrap()
}

async fn serve(api: Arc<FakeApi>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let api = api.clone();
            let service = hyper::service::service_fn(move |req| {
                let response = api.respond(&req);
                async { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

fn config_for(addr: SocketAddr) -> kube::Config {
    kube::Config::new(format!("http://{addr}").parse().unwrap())
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn watch_pods_follows_list_and_watch() {
    let mut mirror = pod("kube-apiserver-node-a", "mirror-api-uid", NODE, "9");
    mirror.metadata.annotations =
        Some([(MIRROR_ANNOTATION.to_owned(), "5f0c9a6e1d".to_owned())].into());
    let elsewhere = pod(
        "db-0",
        "0c9d4b3e-0000-4000-8000-000000000000",
        "node-b",
        "8",
    );
    let (events, first_watch) = mpsc::unbounded();
    let (_quiet, second_watch) = mpsc::unbounded();
    let api = Arc::new(FakeApi {
        pods: vec![web_pod("7"), mirror, elsewhere],
        watches: Mutex::new([first_watch, second_watch].into()),
        requests: Mutex::default(),
    });
    let index = PodIndex::new(vec!["app".into()]);
    let watching = tokio::spawn(watch_pods(
        config_for(serve(api.clone()).await),
        NODE.into(),
        index.clone(),
    ));

    eventually("the initial list", || index.len() == 2).await;
    let web = PodMeta {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: WEB_UID.into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
        containers: [(HEX_A, "migrate"), (HEX_B, "web")]
            .map(|(id, name)| (id.to_owned(), name.into()))
            .into(),
    };
    assert_eq!(index.get(WEB_UID).as_deref(), Some(&web));
    assert_eq!(index.get(&WEB_UID.replace('-', "_")).as_deref(), Some(&web));
    assert_eq!(
        index
            .container_name(WEB_UID, &format!("containerd://{HEX_B}"))
            .as_deref(),
        Some("web")
    );
    let static_pod = index
        .get("5f0c9a6e1d")
        .expect("mirror pod under its static pod's UID");
    assert_eq!(static_pod.name, "kube-apiserver-node-a");

    let mut started = web_pod("11");
    let statuses = status(&mut started).container_statuses.as_mut().unwrap();
    statuses[1] = container("sidecar", &format!("containerd://{HEX_C}"));
    statuses[1].last_state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: Some(format!("containerd://{HEX_D}")),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    status(&mut started).ephemeral_container_statuses =
        Some(vec![container("debugger", &format!("docker://{HEX_E}"))]);
    events
        .unbounded_send(WatchEvent::Modified(started))
        .unwrap();
    eventually("the started sidecar", || {
        index.container_name(WEB_UID, HEX_C).is_some()
    })
    .await;
    for (id, name) in [(HEX_C, "sidecar"), (HEX_D, "sidecar"), (HEX_E, "debugger")] {
        assert_eq!(
            index.container_name(WEB_UID, id).as_deref(),
            Some(name),
            "{id}"
        );
    }

    events
        .unbounded_send(WatchEvent::Deleted(web_pod("12")))
        .unwrap();
    eventually("the deletion", || index.get(WEB_UID).is_none()).await;
    assert_eq!(index.len(), 1);

    // Ending the watch makes the server send a bookmark; the watcher must resume from it.
    drop(events);
    eventually("the resumed watch", || api.requests().len() == 3).await;
    watching.abort();

    let requests = api.requests();
    for query in &requests {
        assert_eq!(query["fieldSelector"], format!("spec.nodeName={NODE}"));
    }
    let [list, first, resumed] = &requests[..] else {
        unreachable!()
    };
    assert!(!list.contains_key("watch"), "{list:?}");
    assert_eq!(list["resourceVersion"], "0");
    assert_eq!(list["resourceVersionMatch"], "NotOlderThan");
    assert!(!list.contains_key("limit"), "{list:?}");
    assert_eq!(first["watch"], "true");
    assert_eq!(first["resourceVersion"], LIST_VERSION);
    assert_eq!(first["allowWatchBookmarks"], "true");
    assert!(!first.contains_key("sendInitialEvents"), "{first:?}");
    assert_eq!(resumed["resourceVersion"], BOOKMARK_VERSION);
}

#[tokio::test]
async fn watch_pods_keeps_retrying_when_unreachable() {
    // Bound but not listening: connections are refused, and no other test can take the port.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let index = PodIndex::new(vec!["app".into()]);
    let watching = watch_pods(config_for(addr), NODE.into(), index.clone());
    let result = tokio::time::timeout(Duration::from_millis(1500), watching).await;
    assert!(result.is_err(), "watch_pods gave up instead of retrying");
    assert_eq!(index.len(), 0);
}

#[test]
fn relist_replaces_the_index_when_complete() {
    let index = PodIndex::new(vec!["app".into()]);
    let mut relist = None;
    let gone = pod("gone", "uid-gone", NODE, "1");
    index.apply(watcher::Event::Apply(gone), &mut relist);
    index.apply(watcher::Event::Init, &mut relist);
    index.apply(
        watcher::Event::InitApply(pod("kept", "uid-kept", NODE, "2")),
        &mut relist,
    );
    assert!(
        index.get("uid-gone").is_some(),
        "lookups use the old pods until InitDone"
    );
    index.apply(watcher::Event::InitDone, &mut relist);
    assert_eq!(index.get("uid-gone"), None);
    assert_eq!(index.get("uid-kept").unwrap().name, "kept");
}

#[test]
fn a_pod_keeps_only_the_wanted_labels_and_is_shared_not_copied() {
    let index = PodIndex::new(vec!["app".into(), "team".into()]);
    let mut web = web_pod("3");
    web.metadata.labels = Some(
        [
            ("app", "web"),
            ("team", "shop"),
            ("pod-template-hash", "7d9"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into(),
    );
    index.apply(watcher::Event::Apply(web), &mut None);

    let pod = index.get(WEB_UID).unwrap();
    let kept: Vec<_> = pod.labels.keys().map(String::as_str).collect();
    assert_eq!(kept, ["app", "team"]);
    // Every reset of a storm from this pod asks again: each answer is the
    // one stored copy.
    assert!(Arc::ptr_eq(&pod, &index.get(WEB_UID).unwrap()));
    let name = index.container_name(WEB_UID, HEX_B).unwrap();
    assert!(Arc::ptr_eq(
        &name,
        &index.container_name(WEB_UID, HEX_B).unwrap()
    ));
}

#[test]
fn outage_is_reported_once() {
    let listed = || watcher::Event::<Pod>::InitDone;
    let mut outage = Outage::default();
    assert!(!outage.recovered_by(&listed()));
    assert_eq!(outage.error_level(), log::Level::Warn);
    assert_eq!(outage.error_level(), log::Level::Debug);
    assert!(!outage.recovered_by(&watcher::Event::<Pod>::Init));
    assert!(outage.recovered_by(&listed()));
    assert!(!outage.recovered_by(&listed()));
    assert_eq!(outage.error_level(), log::Level::Debug);
}

#[test]
fn node_name_prefers_node_name_env() {
    let unread = || -> std::io::Result<String> { panic!("hostname read despite NODE_NAME") };
    assert_eq!(pick_node_name(Some("node-a".into()), unread), "node-a");
    let hostname = || Ok("host-1\n".to_owned());
    assert_eq!(pick_node_name(Some(String::new()), hostname), "host-1");
    assert_eq!(pick_node_name(None, hostname), "host-1");
    assert!(!node_name().is_empty());
}

#[tokio::test]
async fn client_config_reads_kubeconfig() {
    let path = std::env::temp_dir().join(format!("tcprst-k8s-{}.kubeconfig", std::process::id()));
    let kubeconfig = "
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'http://127.0.0.1:6443'}}]
users: [{name: u, user: {}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
";
    std::fs::write(&path, kubeconfig).unwrap();
    let config = client_config(Some(&path)).await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        config.unwrap().unwrap().cluster_url,
        "http://127.0.0.1:6443/"
    );

    let err = client_config(Some(&path)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains(&path.display().to_string()),
        "{err:#}"
    );
}

#[test]
fn container_ids_drop_the_scheme() {
    assert_eq!(
        bare_container_id(&format!("containerd://{HEX_A}")),
        Some(HEX_A)
    );
    assert_eq!(bare_container_id(HEX_A), Some(HEX_A));
    assert_eq!(bare_container_id(""), None);
    assert_eq!(bare_container_id("docker://"), None);
}
