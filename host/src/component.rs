//! What a component file says about itself without being compiled: its top-level imports
//! and exports, read with `wasmparser`. Which world a plugin is written for, which engine
//! compiles it, what `switchyard check` lists and what an OCI artifact's config records all
//! come from here.

/// A component's top-level import and export names.
#[derive(Debug, Default)]
pub struct Interface {
    /// Import names, in the file's order.
    pub imports: Vec<String>,
    /// Export names, in the file's order.
    pub exports: Vec<String>,
}

/// Reads the top-level imports and exports of the component in `bytes` without compiling
/// it (which world it is decides which engine compiles it).
pub fn interface(bytes: &[u8]) -> Result<Interface, String> {
    use wasmparser::{Encoding, Parser, Payload};

    let mut interface = Interface::default();
    // Nested modules and components have headers and ends of their own; only names at
    // depth 1 belong to the file's own component.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("not a valid WebAssembly file: {e}"))?;
        match payload {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding == Encoding::Module {
                    return Err("a core WebAssembly module, not a component: build for \
                                wasm32-wasip2, or wrap it with `wasm-tools component new`"
                        .to_owned());
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(|e| format!("unreadable import: {e}"))?;
                    interface.imports.push(import.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    let export = export.map_err(|e| format!("unreadable export: {e}"))?;
                    interface.exports.push(export.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(interface)
}
