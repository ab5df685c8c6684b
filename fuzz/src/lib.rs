//! Helpers shared by the fuzz targets.
use tollgate_agent::providers::Api;

/// The provider API a fuzz input's selector byte picks.
pub fn api(selector: u8) -> Api {
    match selector % 6 {
        0 => Api::Openai,
        1 => Api::Anthropic,
        2 => Api::Gemini,
        3 => Api::Mcp,
        4 => Api::Bedrock,
        _ => Api::Vertex,
    }
}
