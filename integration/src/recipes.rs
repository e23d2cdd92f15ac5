//! The recipes of `examples/` (docs/recipes.md): HAProxy and nginx under baton, configured as
//! the tests (`tests/suite/recipes.rs`) and the peer benchmark run them.

use std::path::{Path, PathBuf};

/// The `supervisor:` section of both recipes in the tests: room for the many draining
/// generations of a reload every 200 ms, files in the test's directory.
const SUPERVISOR: &str = "supervisor:
  max_draining: 16
  runtime_dir: \"{dir}/run\"
  control:
    socket: \"{dir}/baton.sock\"
";

/// The program `name` from PATH or the system directories, or a failure saying what to install.
pub fn program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is needed for this test: apt-get install {package} (.ci/run installs it)"
            )
        })
}

pub fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path)
}

/// HAProxy under baton as `examples/haproxy/baton.yaml` runs it, on `port`, with `cfg`.
pub fn haproxy_yaml(cfg: &Path, port: u16) -> String {
    format!(
        "listeners:
  - name: http
    address: \"127.0.0.1:{port}\"
worker:
  command: {}
  args: [-f, \"{}\", -db]
  protocol: systemd
  processes: 2
  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}
  drain_signal: SIGUSR1
  drain_timeout: 10s
  ready_timeout: 10s
{SUPERVISOR}",
        program("haproxy", "haproxy").display(),
        cfg.display()
    )
}

/// nginx under baton as `examples/nginx/baton.yaml` runs it, on `port`: the example's template
/// and start script copied to `dir` with the port changed.
pub fn nginx_yaml(dir: &Path, port: u16) -> String {
    program("nginx", "nginx-light");
    let template = std::fs::read_to_string(example("nginx/nginx.conf.in")).unwrap();
    std::fs::write(
        dir.join("nginx.conf.in"),
        template.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    std::fs::copy(example("nginx/start.sh"), dir.join("start.sh")).unwrap();
    format!(
        "listeners:
  - name: http
    address: \"127.0.0.1:{port}\"
worker:
  command: {}/start.sh
  env:
    NGINX: \"3;\"
    NGINX_RUN_DIR: \"{{dir}}/run\"
  protocol: systemd
  processes: 2
  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}
  drain_signal: SIGQUIT
  drain_timeout: 10s
{SUPERVISOR}",
        dir.display()
    )
}

/// `examples/haproxy/haproxy.cfg` in `dir`, its answer ending in `, tag {tag}` (the peer
/// benchmark's way to see which configuration serves).
pub fn haproxy_cfg(dir: &Path, tag: u64) -> PathBuf {
    let cfg = dir.join("haproxy.cfg");
    let text = std::fs::read_to_string(example("haproxy/haproxy.cfg")).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "hello from haproxy\\n",
            &format!("hello from haproxy, tag {tag}\\n"),
        ),
    )
    .unwrap();
    cfg
}

/// nginx's template in `dir` (as `nginx_yaml` writes it), its answer ending in `, tag {tag}`.
pub fn nginx_tag(dir: &Path, tag: u64) {
    let template = dir.join("nginx.conf.in");
    let text = std::fs::read_to_string(&template).unwrap();
    let start = text.find("hello from nginx").unwrap();
    let end = start + text[start..].find("\\n").unwrap();
    let tagged = format!(
        "{}hello from nginx, tag {tag}{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(&template, tagged).unwrap();
}
