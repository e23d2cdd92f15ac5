//! The recipes of `examples/` (docs/recipes.md): HAProxy, nginx, uvicorn, gunicorn and a Go server under
//! baton, configured as the tests (`tests/suite/recipes.rs`) and the peer benchmark run them.

use std::path::{Path, PathBuf};

/// The `supervisor:` section of both recipes in the tests: room for the many draining
/// generations of a reload every 200 ms, files in the test's directory.
const SUPERVISOR: &str = "supervisor:
  max_draining: 16
  runtime_dir: \"{dir}/run\"
  control:
    socket: \"{dir}/baton.sock\"
";

/// Where `integration/run-tests.sh` installs the recipes' Python servers (a virtual environment,
/// so that Debian's own Python is left alone).
pub fn recipes_venv() -> PathBuf {
    // No `..` in it: inside a booted systemd's namespace `integration/` may not exist (a build
    // under /tmp brings back only its target directory), and `a/../b` needs `a`.
    repository().join("target/recipes-venv")
}

/// The program `name` from the recipes' virtual environment (the pinned versions), PATH or the
/// system directories, or a failure saying what to install.
pub fn program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let venv = recipes_venv().join("bin");
    [venv]
        .into_iter()
        .chain(path.split(':').map(PathBuf::from))
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is needed for this test: install {package} (integration/run-tests.sh does)"
            )
        })
}

pub fn example(path: &str) -> PathBuf {
    repository().join("examples").join(path)
}

/// One listener, `http` on 127.0.0.1:`port` with `options` (YAML lines), `worker` (the lines
/// below `worker:`) and the tests' supervisor section.
fn recipe_yaml(port: u16, options: &str, worker: &str) -> String {
    format!(
        "listeners:\n  - name: http\n    address: \"127.0.0.1:{port}\"\n{options}worker:\n{worker}{SUPERVISOR}"
    )
}

/// HAProxy under baton as `examples/haproxy/baton.yaml` runs it, on `port`, with `cfg`.
pub fn haproxy_yaml(cfg: &Path, port: u16) -> String {
    recipe_yaml(
        port,
        "",
        &format!(
            "  command: {}
  args: [-f, \"{}\", -db]
  protocol: systemd
  processes: 2
  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}
  drain_signal: SIGUSR1
  drain_timeout: 10s
  ready_timeout: 10s
",
            program("haproxy", "Debian's haproxy").display(),
            cfg.display()
        ),
    )
}

/// nginx under baton as `examples/nginx/baton.yaml` runs it, on `port`: the example's template
/// and start script copied to `dir` with the port changed.
pub fn nginx_yaml(dir: &Path, port: u16) -> String {
    program("nginx", "Debian's nginx-light");
    let template = std::fs::read_to_string(example("nginx/nginx.conf.in")).unwrap();
    std::fs::write(
        dir.join("nginx.conf.in"),
        template.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    std::fs::copy(example("nginx/start.sh"), dir.join("start.sh")).unwrap();
    recipe_yaml(
        port,
        "    nonblocking: true\n",
        &format!(
            "  command: {}/start.sh
  env:
    NGINX: \"3;\"
    NGINX_RUN_DIR: \"{{dir}}/run\"
  protocol: systemd
  processes: 2
  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}
  drain_signal: SIGQUIT
  drain_timeout: 10s
",
            dir.display()
        ),
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

/// uvicorn under baton as `examples/uvicorn/baton.yaml` runs it, on `port`, serving the app in
/// `dir` (a copy of `examples/uvicorn/app.py`, which a test may break).
pub fn uvicorn_yaml(dir: &Path, port: u16) -> String {
    let uvicorn = program(
        "uvicorn",
        "uvicorn from PyPI (pip install -r examples/uvicorn/requirements.txt)",
    );
    std::fs::copy(example("uvicorn/app.py"), dir.join("app.py")).unwrap();
    recipe_yaml(
        port,
        "    nodelay: true\n",
        &format!(
            "  command: {}
  args: [app:app, --fd, \"3\", --no-access-log, --timeout-graceful-shutdown, \"5\"]
  cwd: \"{}\"
  protocol: systemd
  processes: 2
  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}
  drain_signal: SIGTERM
  drain_timeout: 10s
  ready_timeout: 20s
",
            uvicorn.display(),
            dir.display()
        ),
    )
}

/// gunicorn under baton as `examples/gunicorn/baton.yaml` runs it, on `port`, from `dir` (a
/// copy of `examples/gunicorn/`, which a test may change).
pub fn gunicorn_yaml(dir: &Path, port: u16) -> String {
    let gunicorn = program(
        "gunicorn",
        "gunicorn from PyPI (pip install -r examples/gunicorn/requirements.txt)",
    );
    for file in ["app.py", "gunicorn.conf.py"] {
        std::fs::copy(example(&format!("gunicorn/{file}")), dir.join(file)).unwrap();
    }
    recipe_yaml(
        port,
        "",
        &format!(
            "  command: {}
  args: [-c, gunicorn.conf.py, app:app]
  cwd: \"{}\"
  protocol: systemd
  processes: 1
  ready: {{all: [notify, {{http: \"{{dir}}/run/probe-{{worker}}.sock\", interval: 20ms}}]}}
  drain_signal: SIGTERM
  drain_timeout: 10s
  ready_timeout: 20s
",
            gunicorn.display(),
            dir.display()
        ),
    )
}

/// `examples/go` built with Debian's Go into `dir`: the binary's path.
pub fn go_hello(dir: &Path) -> PathBuf {
    let go = program("go", "Debian's golang-go");
    let out = dir.join("go-hello");
    let built = std::process::Command::new(go)
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(example("go"))
        .output()
        .expect("go build runs");
    assert!(
        built.status.success(),
        "go build examples/go: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    out
}

/// The Go server under baton as `examples/go/baton.yaml` runs it, on `port`.
pub fn go_yaml(binary: &Path, port: u16) -> String {
    recipe_yaml(
        port,
        "",
        &format!(
            "  command: \"{}\"
  protocol: systemd
  processes: 2
  drain_signal: SIGTERM
  drain_timeout: 10s
",
            binary.display()
        ),
    )
}

/// The Python example (`examples/python-worker`, systemd protocol, `READY=1`) on `port`.
pub fn python_yaml(port: u16) -> String {
    recipe_yaml(
        port,
        "",
        &format!(
            "  command: {}\n  protocol: systemd\n  ready: notify\n  processes: 2\n  ready_timeout: 10s\n  drain_timeout: 10s\n",
            example("python-worker/server.py").display()
        ),
    )
}

/// The Node example (`examples/node-worker`, systemd protocol) on `port`: Node cannot
/// `sd_notify`, so its readiness is a probe it answers on a Unix socket of its own.
pub fn node_yaml(port: u16) -> String {
    recipe_yaml(
        port,
        "",
        &format!(
            "  command: {}\n  protocol: systemd\n  ready: {{http: \"{{dir}}/run/probe-{{worker}}.sock\", path: /ready}}\n  processes: 2\n  ready_timeout: 10s\n  drain_timeout: 10s\n",
            example("node-worker/server.js").display()
        ),
    )
}

/// The repository's root directory.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ is in the repository")
        .to_path_buf()
}
