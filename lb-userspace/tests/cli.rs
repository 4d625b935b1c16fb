//! The `lb` command's surface without root: help with every flag's default, completions, and
//! the exit code of bad flags and configuration.

use std::process::Command;

fn lb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb")).args(args).output().expect("running lb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_gives_defaults_and_exit_codes() {
    let (code, help, _) = lb(&["run", "--help"]);
    assert_eq!(code, 0);
    for default in [
        "--metrics-bind-address <METRICS_BIND_ADDRESS>",
        "[default: 127.0.0.1:10249]",
        "[default: 0.0.0.0:10256]",
        "[default: 10ms]",
        "[default: 30s]",
        "--config <CONFIG>",
        "--log-format <LOG_FORMAT>",
    ] {
        assert!(help.contains(default), "lb run --help lacks {default:?}:\n{help}");
    }
    // The read-only commands' flags say what they mean too.
    for command in ["services", "endpoints", "stats", "explain", "counters", "conntrack", "cleanup"] {
        let (code, help, _) = lb(&[command, "--help"]);
        assert_eq!(code, 0);
        assert!(
            help.contains("Where the running (or stopped) lb pinned its maps")
                && help.contains("[default: /sys/fs/bpf/lb]"),
            "lb {command} --help:\n{help}"
        );
    }
    let (_, help, _) = lb(&["--help"]);
    for command in
        ["endpoints", "explain", "stats", "completions", "Exit codes: 0 done, 1 failed, 2 bad flags"]
    {
        assert!(help.contains(command), "lb --help lacks {command:?}:\n{help}");
    }
}

#[test]
fn completions_cover_the_commands() {
    let (code, script, _) = lb(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(script.contains("complete -F _lb") && script.contains("explain") && script.contains("--watch"));
    assert_eq!(lb(&["completions", "zsh"]).0, 0);
}

#[test]
fn bad_flags_and_configuration_exit_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbogus: 1\n",
    )
    .unwrap();
    let (code, _, stderr) = lb(&["run", "--interfaces", "lo", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown field \"bogus\" (not a KubeProxyConfiguration field)"), "{stderr}");
    let (code, _, stderr) = lb(&["run", "--interfaces", "lo", "--metrics-bind-address", "localhost"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--metrics-bind-address \"localhost\""), "{stderr}");
    let (code, _, stderr) = lb(&["explain", "10.0.0.2:1000", "10.96.0.1:80/DCCP"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the protocol must be TCP, UDP or SCTP"), "{stderr}");
    assert_eq!(lb(&["run"]).0, 2, "a missing required flag (clap)");
}
