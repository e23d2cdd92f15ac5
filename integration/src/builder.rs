//! [`MasterBuilder`]: how a test declares a master.

use crate::event;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Master, TestConfig, binaries};

/// How a test declares a master: its configuration (YAML, a [`TestConfig`], or a file laid
/// out in its directory), its environment, a wrapper program, which baton; then
/// [`MasterBuilder::spawn`] (no wait) or [`MasterBuilder::serving`] (its first generation
/// serves). [`Master::start`], [`Master::spawn`] and the others are shorthands of it.
pub struct MasterBuilder<'a> {
    name: String,
    config: BuilderConfig<'a>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    program: PathBuf,
}

enum BuilderConfig<'a> {
    Yaml(String),
    LaidOut(Box<dyn FnOnce(&Path) -> PathBuf + 'a>),
}

impl std::fmt::Debug for MasterBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterBuilder")
            .field("name", &self.name)
            .field("env", &self.env)
            .field("wrapper", &self.wrapper)
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

impl<'a> MasterBuilder<'a> {
    pub(crate) fn new(name: &str) -> Self {
        MasterBuilder {
            name: name.to_string(),
            config: BuilderConfig::Yaml(String::new()),
            env: Vec::new(),
            wrapper: Vec::new(),
            program: binaries().baton.clone(),
        }
    }

    /// Its configuration: YAML in which `{dir}` is the master's directory.
    pub fn yaml(mut self, yaml: &str) -> Self {
        self.config = BuilderConfig::Yaml(yaml.to_string());
        self
    }

    pub fn config(self, config: &TestConfig) -> Self {
        self.yaml(&config.yaml())
    }

    /// The configuration file `layout` makes in the master's directory (a symlink chain,
    /// say), and returns the path of.
    pub fn laid_out(mut self, layout: impl FnOnce(&Path) -> PathBuf + 'a) -> Self {
        self.config = BuilderConfig::LaidOut(Box::new(layout));
        self
    }

    /// One more environment variable (as a service manager would set it).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs `wrapper... baton run ...` (e.g. `unshare --pid --fork`): [`Master::pid`] is then
    /// the wrapper's.
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        self
    }

    /// Another baton program (one a test replaces, as a package update does).
    pub fn program(mut self, program: &Path) -> Self {
        self.program = program.to_owned();
        self
    }

    /// Starts it without waiting for anything.
    pub fn spawn(self) -> Master {
        let dir = tempfile::Builder::new()
            .prefix(&format!("baton-{}-", self.name))
            .tempdir()
            .unwrap();
        let config_path = match self.config {
            BuilderConfig::Yaml(yaml) => {
                let path = dir.path().join("baton.yaml");
                let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
                std::fs::write(&path, yaml).unwrap();
                path
            }
            BuilderConfig::LaidOut(layout) => layout(dir.path()),
        };
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        Master::spawn_at(&self.name, dir, config_path, &env, &wrapper, &self.program)
    }

    /// Starts it and waits until its first generation serves.
    pub fn serving(self) -> Master {
        let master = self.spawn();
        master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
        master
    }
}
