//! `lb run --config FILE`: kube-proxy's `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), so the ConfigMap a cluster already has for kube-proxy
//! configures lb. Fields that mean something to lb are taken; kube-proxy fields that do not
//! (iptables, IPVS, nftables and Windows settings, say) are named in warnings; a field kube-proxy
//! does not know either is refused, as kube-proxy's strict decoding refuses it. Command-line
//! flags override the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// What the file sets; `None` where it is silent.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub nodeport_addresses: Option<Vec<ipnet::IpNet>>,
    pub min_sync_period: Option<Duration>,
    pub sync_period: Option<Duration>,
    pub conntrack_tcp_timeout_established: Option<Duration>,
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,
    pub conntrack_udp_timeout: Option<Duration>,
    pub conntrack_udp_timeout_stream: Option<Duration>,
    /// `logging.format`: `text` or `json`.
    pub log_format: Option<String>,
    /// Settings kube-proxy has and lb does not use, by their path in the file.
    pub ignored: Vec<String>,
}

const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// kube-proxy fields without a meaning for lb: accepted, and named in a warning.
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "clusterCIDR",
    "configSyncPeriod",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "ipvs",
    "iptables.masqueradeAll",
    "iptables.masqueradeBit",
    "iptables.localhostNodePorts",
    "nftables.masqueradeAll",
    "nftables.masqueradeBit",
    "mode",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "windowsRunAsService",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpBeLiberal",
    "linux.masqueradeAll",
    "linux.oomScoreAdj",
    "linux.conntrack.maxPerCore",
    "linux.conntrack.min",
    "linux.conntrack.tcpBeLiberal",
    "logging.flushFrequency",
    "logging.verbosity",
    "logging.vmodule",
    "logging.options",
    "healthzBindAddress",
    "metricsBindAddress",
];

/// Go's duration syntax (`1h0m0s`, `30s`, `250ms`), as the file writes durations.
fn go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += Duration::from_secs_f64(number * seconds);
        rest = &rest[unit_len..];
    }
    Some(total)
}

struct Reader<'a> {
    path: &'a Path,
    config: FileConfig,
}

impl Reader<'_> {
    fn invalid(&self, problem: String) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_path_buf(), problem }
    }

    fn string(&self, field: &str, value: &Value) -> Result<Option<String>, ConfigError> {
        match value {
            Value::Null => Ok(None),
            Value::String(text) if text.is_empty() => Ok(None),
            Value::String(text) => Ok(Some(text.clone())),
            other => Err(self.invalid(format!("{field} must be a string, not {other:?}"))),
        }
    }

    /// A duration; zero, as kubeadm writes for "kube-proxy's default", is no setting.
    fn duration(&self, field: &str, value: &Value) -> Result<Option<Duration>, ConfigError> {
        match self.string(field, value)? {
            None => Ok(None),
            Some(text) => go_duration(&text).map(|d| Some(d).filter(|d| !d.is_zero())).ok_or_else(|| {
                self.invalid(format!("{field}: {text:?} is not a duration (like 30s or 1h0m0s)"))
            }),
        }
    }

    /// Walks a mapping; `prefix` is its path in the file.
    fn mapping(&mut self, prefix: &str, mapping: &Mapping) -> Result<(), ConfigError> {
        for (key, value) in mapping {
            let Some(key) = key.as_str() else {
                return Err(self.invalid(format!("{prefix}: a key that is not a string: {key:?}")));
            };
            let field = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
            self.field(&field, value)?;
        }
        Ok(())
    }

    fn field(&mut self, field: &str, value: &Value) -> Result<(), ConfigError> {
        match field {
            "apiVersion" => {
                if value.as_str() != Some(API_VERSION) {
                    return Err(self.invalid(format!("apiVersion must be {API_VERSION}, not {value:?}")));
                }
            }
            "kind" => {
                if value.as_str() != Some("KubeProxyConfiguration") {
                    return Err(self.invalid(format!("kind must be KubeProxyConfiguration, not {value:?}")));
                }
            }
            "clientConnection" | "conntrack" | "iptables" | "nftables" | "linux" | "linux.conntrack"
            | "logging" => match value {
                Value::Mapping(inner) => self.mapping(field, inner)?,
                Value::Null => {}
                other => return Err(self.invalid(format!("{field} must be a mapping, not {other:?}"))),
            },
            "clientConnection.kubeconfig" => {
                self.config.kubeconfig = self.string(field, value)?.map(PathBuf::from)
            }
            "hostnameOverride" => self.config.hostname_override = self.string(field, value)?,
            "healthzBindAddress" if !value.is_null() => {
                self.config.healthz_bind_address = Some(self.string(field, value)?.unwrap_or_default())
            }
            "metricsBindAddress" if !value.is_null() => {
                self.config.metrics_bind_address = Some(self.string(field, value)?.unwrap_or_default())
            }
            "nodePortAddresses" => {
                let mut ranges = Vec::new();
                for item in value.as_sequence().into_iter().flatten() {
                    let text = self.string(field, item)?.unwrap_or_default();
                    if text == "primary" {
                        // kube-proxy's "the node's primary addresses": lb's default (every
                        // address of the node) is the closest; the warning names it.
                        self.config.ignored.push(
                            "nodePortAddresses: primary (lb serves NodePorts on every node address)".into(),
                        );
                        continue;
                    }
                    match text.parse::<ipnet::IpNet>() {
                        Ok(range) => ranges.push(range),
                        Err(_) => {
                            return Err(self.invalid(format!("nodePortAddresses: {text:?} is not a CIDR")));
                        }
                    }
                }
                self.config.nodeport_addresses = Some(ranges).filter(|r| !r.is_empty());
            }
            // kube-proxy took these per mode, then (v1.28) for every mode at the top level,
            // which wins.
            "minSyncPeriod" => self.config.min_sync_period = self.duration(field, value)?,
            "syncPeriod" => self.config.sync_period = self.duration(field, value)?,
            "iptables.minSyncPeriod" | "nftables.minSyncPeriod" => {
                let period = self.duration(field, value)?;
                self.config.min_sync_period = self.config.min_sync_period.or(period);
            }
            "iptables.syncPeriod" | "nftables.syncPeriod" => {
                let period = self.duration(field, value)?;
                self.config.sync_period = self.config.sync_period.or(period);
            }
            "conntrack.tcpEstablishedTimeout" | "linux.conntrack.tcpEstablishedTimeout" => {
                self.config.conntrack_tcp_timeout_established = self.duration(field, value)?
            }
            "conntrack.tcpCloseWaitTimeout" | "linux.conntrack.tcpCloseWaitTimeout" => {
                self.config.conntrack_tcp_timeout_close_wait = self.duration(field, value)?
            }
            "conntrack.udpTimeout" | "linux.conntrack.udpTimeout" => {
                self.config.conntrack_udp_timeout = self.duration(field, value)?
            }
            "conntrack.udpStreamTimeout" | "linux.conntrack.udpStreamTimeout" => {
                self.config.conntrack_udp_timeout_stream = self.duration(field, value)?
            }
            "logging.format" => {
                let format = self.string(field, value)?;
                if let Some(format) = &format
                    && format != "text"
                    && format != "json"
                {
                    return Err(self.invalid(format!("logging.format must be text or json, not {format:?}")));
                }
                self.config.log_format = format;
            }
            _ if IGNORED.contains(&field) || IGNORED.iter().any(|i| field.starts_with(&format!("{i}."))) => {
                if !value.is_null() {
                    self.config.ignored.push(field.to_string());
                }
            }
            _ => {
                return Err(
                    self.invalid(format!("unknown field {field:?} (not a KubeProxyConfiguration field)"))
                );
            }
        }
        Ok(())
    }
}

/// Reads a KubeProxyConfiguration. A ConfigMap's `config.conf` key is the file kube-proxy reads;
/// a whole ConfigMap manifest is accepted too, and its `config.conf` taken.
pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let yaml = |text: &str| {
        serde_yaml_ng::from_str::<Value>(text)
            .map_err(|source| ConfigError::Yaml { path: path.into(), source })
    };
    let mut value = yaml(text)?;
    if value.get("kind").and_then(Value::as_str) == Some("ConfigMap") {
        let inner = value.get("data").and_then(|d| d.get("config.conf")).and_then(Value::as_str).ok_or_else(
            || ConfigError::Invalid {
                path: path.into(),
                problem: "a ConfigMap without data.config.conf".into(),
            },
        )?;
        value = yaml(inner)?;
    }
    let Value::Mapping(mapping) = &value else {
        return Err(ConfigError::Invalid {
            path: path.into(),
            problem: "not a KubeProxyConfiguration mapping".into(),
        });
    };
    let mut reader = Reader { path, config: FileConfig::default() };
    reader.mapping("", mapping)?;
    Ok(reader.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1h0m0s"), Some(Duration::from_secs(3600)));
        assert_eq!(go_duration("24h0m0s"), Some(Duration::from_secs(86_400)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("ten"), None);
        assert_eq!(go_duration("10"), None);
    }

    /// What `kubeadm` writes for kube-proxy (v1.34), trimmed of nothing.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 12h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nodePortAddresses: ["10.0.0.0/8", "primary"]
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
"#;

    #[test]
    fn kubeadms_configuration_is_read_and_its_other_settings_named() {
        let config = parse(Path::new("config.conf"), KUBEADM).unwrap();
        assert_eq!(config.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")));
        assert_eq!(config.conntrack_tcp_timeout_established, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(config.min_sync_period, Some(Duration::from_secs(1)));
        assert_eq!(config.sync_period, None, "0s is kube-proxy's default");
        assert_eq!(config.conntrack_udp_timeout, None);
        assert_eq!(config.healthz_bind_address.as_deref(), Some("0.0.0.0:10256"));
        assert_eq!(config.metrics_bind_address.as_deref(), Some("127.0.0.1:10249"));
        assert_eq!(config.nodeport_addresses, Some(vec!["10.0.0.0/8".parse().unwrap()]));
        assert!(
            config.ignored.iter().any(|i| i.starts_with("nodePortAddresses: primary")),
            "{:?}",
            config.ignored
        );
        assert_eq!(config.hostname_override, None);
        for named in ["clusterCIDR", "ipvs", "mode", "winkernel", "bindAddress", "conntrack.tcpBeLiberal"] {
            assert!(
                config.ignored.iter().any(|i| i == named || i.starts_with(&format!("{named}."))),
                "{named}: {:?}",
                config.ignored
            );
        }
    }

    #[test]
    fn a_configmap_is_unwrapped_and_unknown_fields_refused() {
        let configmap = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube-proxy\ndata:\n  config.conf: |\n{}",
            "    apiVersion: kubeproxy.config.k8s.io/v1alpha1\n    kind: KubeProxyConfiguration\n    minSyncPeriod: 250ms\n    logging:\n      format: json\n"
        );
        let config = parse(Path::new("cm.yaml"), &configmap).unwrap();
        assert_eq!(config.min_sync_period, Some(Duration::from_millis(250)));
        assert_eq!(config.log_format.as_deref(), Some("json"));
        let error = parse(
            Path::new("bad.yaml"),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nsyncPeriodd: 1s\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("unknown field \"syncPeriodd\""), "{error}");
        let error = parse(
            Path::new("bad.yaml"),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  tcpEstablishedTimeout: soon\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("conntrack.tcpEstablishedTimeout"), "{error}");
    }
}
