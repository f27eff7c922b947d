//! A router that panics on every `plan`: the host must turn the trap into a 500 naming the plugin.

use tollgate_plugin_sdk::export_router;
use tollgate_plugin_sdk::router::{Attempt, Channel, RequestFacts, RouteError, Router};

struct Trap;

impl Router for Trap {
    fn plan(_facts: RequestFacts, _channels: Vec<Channel>) -> Result<Vec<Attempt>, RouteError> {
        panic!("this test plugin always traps");
    }
}

export_router!(Trap);
