//! The plugins compiled into the binary (built by `host/build.rs`), used when the config names a
//! plugin by its shipped name rather than a file.

use super::Role;

/// A plugin shipped inside the binary.
pub struct ShippedPlugin {
    /// The name a config uses for it.
    pub name: &'static str,
    /// Its role.
    pub role: Role,
    /// The component bytes.
    pub bytes: &'static [u8],
}

/// Every shipped plugin.
pub const SHIPPED: &[ShippedPlugin] = &[
    ShippedPlugin {
        name: "openai",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_openai.wasm"
        )),
    },
    ShippedPlugin {
        name: "anthropic",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_anthropic.wasm"
        )),
    },
    ShippedPlugin {
        name: "gemini",
        role: Role::Translator,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_translator_gemini.wasm"
        )),
    },
    ShippedPlugin {
        name: "failover",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_failover.wasm"
        )),
    },
    ShippedPlugin {
        name: "cost-first",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_cost_first.wasm"
        )),
    },
    ShippedPlugin {
        name: "latency-first",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_latency_first.wasm"
        )),
    },
    ShippedPlugin {
        name: "least-busy",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_least_busy.wasm"
        )),
    },
    ShippedPlugin {
        name: "weighted",
        role: Role::Router,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_router_weighted.wasm"
        )),
    },
    ShippedPlugin {
        name: "price-table",
        role: Role::Billing,
        bytes: include_bytes!(concat!(
            env!("TOLLGATE_GUEST_DIR"),
            "/tollgate_billing_price_table.wasm"
        )),
    },
];

/// The shipped plugin of this role and name, if there is one.
pub fn find(role: Role, name: &str) -> Option<&'static ShippedPlugin> {
    SHIPPED
        .iter()
        .find(|plugin| plugin.role == role && plugin.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_BYTES: u64 = 4096;

    /// The pages a core module's initialised data spans, the largest over the component's modules:
    /// wasmtime maps that span (its memory image) into every instance.
    fn data_image_pages(component: &[u8]) -> u64 {
        let mut largest = 0;
        let mut span: Option<(u64, u64)> = None;
        for payload in wasmparser::Parser::new(0).parse_all(component) {
            match payload.expect("a shipped plugin parses") {
                wasmparser::Payload::DataSection(reader) => {
                    for data in reader {
                        let data = data.expect("a data segment parses");
                        let wasmparser::DataKind::Active { offset_expr, .. } = data.kind else {
                            continue;
                        };
                        let Some(Ok(wasmparser::Operator::I32Const { value })) =
                            offset_expr.get_operators_reader().into_iter().next()
                        else {
                            panic!("an active segment at a constant offset");
                        };
                        let start = u64::from(value.cast_unsigned());
                        let end = start + data.data.len() as u64;
                        span =
                            Some(span.map_or((start, end), |(low, high)| {
                                (low.min(start), high.max(end))
                            }));
                    }
                }
                wasmparser::Payload::End(_) => {
                    if let Some((low, high)) = span.take() {
                        let pages = high.div_ceil(PAGE_BYTES) - low / PAGE_BYTES;
                        largest = largest.max(pages);
                    }
                }
                _ => {}
            }
        }
        largest
    }

    /// Every open stream holds a translator instance, and resident memory counts the pages of its
    /// data image once per instance (the kernel maps all of them on the first read). These are the
    /// sizes they were brought down to; growing one costs that much per open stream, so it needs a
    /// reason. What they guard: zmij (serde_json's float formatting) built for size, whose tables
    /// otherwise add 15 KiB to every translator, and no float parsing (10 KiB of tables).
    #[test]
    fn shipped_translators_data_images_stay_within_their_page_budgets() {
        let budgets = [("openai", 6), ("anthropic", 9), ("gemini", 8)];
        for (name, budget) in budgets {
            let plugin = find(Role::Translator, name).expect("a shipped translator");
            let pages = data_image_pages(plugin.bytes);
            assert!(
                (1..=budget).contains(&pages),
                "{name}'s data image spans {pages} pages of 4 KiB, over its budget of {budget}"
            );
        }
        let translators = SHIPPED
            .iter()
            .filter(|plugin| plugin.role == Role::Translator)
            .count();
        assert_eq!(
            translators,
            budgets.len(),
            "every shipped translator has a budget"
        );
    }
}
