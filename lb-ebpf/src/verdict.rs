//! What the program tells TC, with the counter that explains it.

use aya_ebpf::bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};

/// Let the packet continue: with TCX this is TCX_NEXT, so programs attached after lb (a CNI's,
/// say) still see the packet; when lb is last, the kernel passes it up the stack.
pub const TC_PASS: i32 = TC_ACT_UNSPEC;
pub const TC_DROP: i32 = TC_ACT_SHOT;

pub struct Verdict {
    pub action: i32,
    pub counter: u32,
}

impl Verdict {
    pub const fn pass(counter: u32) -> Self {
        Self { action: TC_PASS, counter }
    }

    pub const fn drop(counter: u32) -> Self {
        Self { action: TC_DROP, counter }
    }

    /// The packet was rewritten and `bpf_redirect` told where it goes.
    pub const fn redirect(counter: u32) -> Self {
        Self { action: TC_ACT_REDIRECT, counter }
    }
}
