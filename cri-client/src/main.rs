//! `cri-client`: a small kubelet-like client of the Kubernetes Container Runtime Interface
//! (CRI v1) over a Unix socket, such as containerd's CRI plugin. flint's CRI test
//! (tests/containerd.rs) and resources/bench-cri.sh drive a runtime handler with it the way
//! a kubelet does: pods made with `RunPodSandbox`, images pulled, containers created,
//! started, exec'd into, looked at, stopped and removed.
//!
//! One call per invocation, its result on stdout, an error as one line on stderr (exit 1):
//!
//! ```text
//! cri-client [--socket PATH] [--log-dir DIR] COMMAND ARGS...
//!   version                          the runtime's name and version
//!   pull IMAGE                       PullImage; prints the image's reference
//!   run-pod NAME HANDLER             RunPodSandbox with that runtime handler; prints its id
//!   pod-status POD                   PodSandboxStatus: its state and IP
//!   create POD NAME IMAGE CMD...     CreateContainer in the pod; prints its id
//!   start ID                         StartContainer
//!   exec ID SECS CMD...              ExecSync: the command's stdout and stderr, its exit code
//!                                    as this program's
//!   status ID                        ContainerStatus: `STATE exit=N reason=R`
//!   wait ID STATE SECS               ContainerStatus until STATE (RUNNING, EXITED, ...)
//!   stop ID SECS                     StopContainer with a grace period
//!   remove ID                        RemoveContainer
//!   stop-pod POD                     StopPodSandbox
//!   remove-pod POD                   RemovePodSandbox
//!   pods | containers                the ids the runtime lists, one a line
//!   bench HANDLER IMAGE PODS PARALLEL
//!                                    PODS pods, PARALLEL at a time, each with one container
//!                                    running `sleep 600`: the time from RunPodSandbox to the
//!                                    container RUNNING, per pod (ms), then all removed
//! ```
//!
//! `--log-dir` is the pods' log directory (`PodSandboxConfig.log_directory`), where the
//! runtime writes each container's output to `NAME.log` (the CRI log format); give it to
//! `run-pod` and `create` alike, as a kubelet keeps a pod's configuration.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// containerd's socket unless `--socket` names another.
const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The Kubernetes namespace of the pods made here.
const POD_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the CRI socket {socket}: {source}")]
    Connect {
        socket: String,
        source: tonic::transport::Error,
    },
    #[error("{call}: {}", .status.message())]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{what} has no {field} in the runtime's answer")]
    Missing {
        what: &'static str,
        field: &'static str,
    },
    #[error("container {id} is {state}, not {wanted}, after {secs} s")]
    Timeout {
        id: String,
        state: String,
        wanted: String,
        secs: u64,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// A CRI call's error, named by the call.
fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Call { call, status }
}

struct Options {
    socket: String,
    log_dir: Option<String>,
}

struct Client {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    log_dir: Option<String>,
}

async fn connect(options: &Options) -> Result<Client, Error> {
    let path = options.socket.clone();
    // The URI is not used: every connection is the Unix socket.
    let channel = Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| Error::Connect {
            socket: options.socket.clone(),
            source,
        })?;
    Ok(Client {
        runtime: RuntimeServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
        log_dir: options.log_dir.clone(),
    })
}

fn usage() -> Error {
    Error::Usage(
        "usage: cri-client [--socket PATH] [--log-dir DIR] COMMAND ARGS... (see the source's \
         documentation for the commands)"
            .into(),
    )
}

fn number(text: &str) -> Result<u64, Error> {
    text.parse()
        .map_err(|_| Error::Usage(format!("{text:?} is not a number")))
}

/// A container state's name as the CRI spells it, without its `CONTAINER_` prefix.
fn state_name(state: i32) -> String {
    cri::ContainerState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("CONTAINER_").to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

impl Client {
    /// The configuration of pod `name`: the same each time (a kubelet keeps it), with the
    /// log directory of `--log-dir`.
    fn pod_config(&self, name: &str, uid: &str, attempt: u32) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_string(),
                uid: uid.to_string(),
                namespace: POD_NAMESPACE.to_string(),
                attempt,
            }),
            hostname: name.to_string(),
            log_directory: self.log_dir.clone().unwrap_or_default(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }

    /// The configuration of pod `id`, rebuilt from its metadata.
    async fn pod_config_of(&mut self, id: &str) -> Result<cri::PodSandboxConfig, Error> {
        let status = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: false,
            })
            .await
            .map_err(call("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(Error::Missing {
                what: "PodSandboxStatus",
                field: "status",
            })?;
        let meta = status.metadata.ok_or(Error::Missing {
            what: "PodSandboxStatus",
            field: "metadata",
        })?;
        Ok(self.pod_config(&meta.name, &meta.uid, meta.attempt))
    }

    async fn pull(&mut self, image: &str) -> Result<String, Error> {
        let reply = self
            .images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(call("PullImage"))?;
        Ok(reply.into_inner().image_ref)
    }

    async fn run_pod(&mut self, name: &str, handler: &str) -> Result<String, Error> {
        let uid = format!("{name}-uid");
        let reply = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(self.pod_config(name, &uid, 0)),
                runtime_handler: handler.to_string(),
            })
            .await
            .map_err(call("RunPodSandbox"))?;
        Ok(reply.into_inner().pod_sandbox_id)
    }

    async fn create(
        &mut self,
        pod: &str,
        name: &str,
        image: &str,
        command: &[String],
    ) -> Result<String, Error> {
        let sandbox_config = self.pod_config_of(pod).await?;
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            command: command.to_vec(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let reply = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(call("CreateContainer"))?;
        Ok(reply.into_inner().container_id)
    }

    async fn start(&mut self, id: &str) -> Result<(), Error> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .map_err(call("StartContainer"))?;
        Ok(())
    }

    async fn status(&mut self, id: &str) -> Result<cri::ContainerStatus, Error> {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .map_err(call("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(Error::Missing {
                what: "ContainerStatus",
                field: "status",
            })
    }

    /// Poll the container's status until it is in `wanted` (a state name without its
    /// `CONTAINER_` prefix), for at most `secs` seconds.
    async fn wait(&mut self, id: &str, wanted: &str, secs: u64) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let state = state_name(self.status(id).await?.state);
            if state == wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    id: id.to_string(),
                    state,
                    wanted: wanted.to_string(),
                    secs,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop_pod(&mut self, id: &str) -> Result<(), Error> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(call("StopPodSandbox"))?;
        Ok(())
    }

    async fn remove_pod(&mut self, id: &str) -> Result<(), Error> {
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
            .map_err(call("RemovePodSandbox"))?;
        Ok(())
    }

    /// One pod with one container running `sleep 600`: the time from RunPodSandbox to the
    /// container's RUNNING state, and the pod's id.
    async fn bench_one(
        &mut self,
        index: usize,
        handler: &str,
        image: &str,
    ) -> Result<(Duration, String), Error> {
        let began = Instant::now();
        let pod = self.run_pod(&format!("bench-{index}"), handler).await?;
        let command = ["sleep".to_string(), "600".to_string()];
        let id = self.create(&pod, "sleeper", image, &command).await?;
        self.start(&id).await?;
        self.wait(&id, "RUNNING", 600).await?;
        Ok((began.elapsed(), pod))
    }
}

/// `bench`: `pods` pods, `parallel` at a time; prints each pod's time (ms) and the whole
/// run's pods per minute, then stops and removes them all.
async fn bench(
    options: &Options,
    handler: &str,
    image: &str,
    pods: usize,
    parallel: usize,
) -> Result<(), Error> {
    let began = Instant::now();
    let mut made = Vec::new();
    let mut first_error = None;
    let mut next = 0;
    while next < pods {
        let batch: Vec<usize> = (next..pods.min(next + parallel)).collect();
        next += batch.len();
        let mut tasks = Vec::new();
        for index in batch {
            let mut client = connect(options).await?;
            let (handler, image) = (handler.to_string(), image.to_string());
            tasks.push(tokio::task::spawn_local(async move {
                client.bench_one(index, &handler, &image).await
            }));
        }
        for task in tasks {
            match task.await.expect("a bench task panicked") {
                Ok((took, pod)) => {
                    println!("pod_ms {}", took.as_millis());
                    made.push(pod);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    println!("total_s {secs:.2}");
    println!("pods_per_minute {:.1}", made.len() as f64 * 60.0 / secs);
    let mut client = connect(options).await?;
    for pod in made {
        client.stop_pod(&pod).await?;
        client.remove_pod(&pod).await?;
    }
    first_error.map_or(Ok(()), Err)
}

/// Run one command; `Ok(code)` is the exit status.
async fn run(options: Options, args: &[String]) -> Result<i32, Error> {
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or_else(usage);
    let command = arg(0)?;
    if command == "bench" {
        let (handler, image) = (arg(1)?, arg(2)?);
        let pods = number(arg(3)?)? as usize;
        let parallel = number(arg(4)?)?.max(1) as usize;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(bench(&options, handler, image, pods, parallel))
            .await?;
        return Ok(0);
    }
    let mut client = connect(&options).await?;
    match command {
        "version" => {
            let v = client
                .runtime
                .version(cri::VersionRequest::default())
                .await
                .map_err(call("Version"))?
                .into_inner();
            println!(
                "{} {} (CRI {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version
            );
        }
        "pull" => println!("{}", client.pull(arg(1)?).await?),
        "run-pod" => println!("{}", client.run_pod(arg(1)?, arg(2)?).await?),
        "pod-status" => {
            let status = client
                .runtime
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: arg(1)?.to_string(),
                    verbose: false,
                })
                .await
                .map_err(call("PodSandboxStatus"))?
                .into_inner()
                .status
                .ok_or(Error::Missing {
                    what: "PodSandboxStatus",
                    field: "status",
                })?;
            let state = cri::PodSandboxState::try_from(status.state).map_or_else(
                |_| format!("state {}", status.state),
                |s| s.as_str_name().to_string(),
            );
            let ip = status.network.map(|n| n.ip).unwrap_or_default();
            println!("{state} ip={ip}");
        }
        "create" => {
            let (pod, name, image) = (arg(1)?, arg(2)?, arg(3)?);
            let id = client.create(pod, name, image, &args[4..]).await?;
            println!("{id}");
        }
        "start" => client.start(arg(1)?).await?,
        "exec" => {
            let id = arg(1)?;
            let timeout = number(arg(2)?)?;
            if args.len() < 4 {
                return Err(usage());
            }
            let reply = client
                .runtime
                .exec_sync(cri::ExecSyncRequest {
                    container_id: id.to_string(),
                    cmd: args[3..].to_vec(),
                    timeout: i64::try_from(timeout).unwrap_or(i64::MAX),
                })
                .await
                .map_err(call("ExecSync"))?
                .into_inner();
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&reply.stdout);
            let _ = std::io::stderr().write_all(&reply.stderr);
            return Ok(reply.exit_code);
        }
        "status" => {
            let s = client.status(arg(1)?).await?;
            println!(
                "{} exit={} reason={}",
                state_name(s.state),
                s.exit_code,
                s.reason
            );
        }
        "wait" => {
            let (id, state) = (arg(1)?, arg(2)?);
            client.wait(id, state, number(arg(3)?)?).await?;
        }
        "stop" => {
            client
                .runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: arg(1)?.to_string(),
                    timeout: i64::try_from(number(arg(2)?)?).unwrap_or(i64::MAX),
                })
                .await
                .map_err(call("StopContainer"))?;
        }
        "remove" => {
            client
                .runtime
                .remove_container(cri::RemoveContainerRequest {
                    container_id: arg(1)?.to_string(),
                })
                .await
                .map_err(call("RemoveContainer"))?;
        }
        "stop-pod" => client.stop_pod(arg(1)?).await?,
        "remove-pod" => client.remove_pod(arg(1)?).await?,
        "pods" => {
            let pods = client
                .runtime
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
                .map_err(call("ListPodSandbox"))?
                .into_inner();
            for pod in pods.items {
                println!("{}", pod.id);
            }
        }
        "containers" => {
            let containers = client
                .runtime
                .list_containers(cri::ListContainersRequest::default())
                .await
                .map_err(call("ListContainers"))?
                .into_inner();
            for c in containers.containers {
                println!("{}", c.id);
            }
        }
        _ => return Err(usage()),
    }
    Ok(0)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut options = Options {
        socket: DEFAULT_SOCKET.to_string(),
        log_dir: None,
    };
    while args.len() >= 2 && args[0].starts_with("--") {
        let value = args.remove(1);
        match args.remove(0).as_str() {
            "--socket" => options.socket = value,
            "--log-dir" => options.log_dir = Some(value),
            other => {
                eprintln!("cri-client: unknown option {other}");
                std::process::exit(2);
            }
        }
    }
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| rt.block_on(run(options, &args)));
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cri-client: {e}");
            std::process::exit(1);
        }
    }
}
