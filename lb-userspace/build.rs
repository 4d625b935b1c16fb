//! Builds lb-ebpf for the BPF target (nightly + bpf-linker, installed by `cargo xtask setup`) and
//! leaves the object in OUT_DIR, where `datapath.rs` embeds it.

fn main() -> anyhow::Result<()> {
    // aya-build reruns on changes under lb-ebpf; the shared types live elsewhere.
    println!("cargo:rerun-if-changed=../lb-common/src");
    let ebpf = aya_build::Package { name: "lb-ebpf", root_dir: "../lb-ebpf", ..Default::default() };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).map_err(|err| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {err:#}\n\
             (run `cargo xtask setup` to install the nightly rust-src component and bpf-linker)"
        )
    })
}
