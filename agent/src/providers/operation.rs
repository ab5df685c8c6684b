//! What kind of call a request is: the value of the audit record's
//! `operation`, the metrics' `operation` label, and of a policy rule's
//! `operations:` list.
use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI responses.
    Responses,
    /// OpenAI legacy completions.
    Completions,
    /// OpenAI embeddings, Gemini embedContent / batchEmbedContents.
    Embeddings,
    /// Anthropic messages.
    Messages,
    /// Gemini generateContent / streamGenerateContent.
    GenerateContent,
    /// Batch jobs: OpenAI/Azure batches, Anthropic message batches, Gemini
    /// batchGenerateContent and batches.
    Batch,
    /// File uploads, listings and downloads (a batch's results among them).
    Files,
    /// Realtime sessions (OpenAI/Azure `/realtime`).
    Realtime,
    /// MCP (Model Context Protocol) messages to an `mcp_servers` host.
    Mcp,
    /// Anything else of a provider's API (model listings, token counts, …).
    #[default]
    Other,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Self::Chat,
        Self::Responses,
        Self::Completions,
        Self::Embeddings,
        Self::Messages,
        Self::GenerateContent,
        Self::Batch,
        Self::Files,
        Self::Realtime,
        Self::Mcp,
        Self::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Responses => "responses",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::GenerateContent => "generate_content",
            Self::Batch => "batch",
            Self::Files => "files",
            Self::Realtime => "realtime",
            Self::Mcp => "mcp",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Operation {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_are_the_serde_names() {
        for op in Operation::ALL {
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(json, format!("\"{}\"", op.as_str()));
            let back: Operation = serde_json::from_str(&json).unwrap();
            assert_eq!(back, op);
        }
    }
}
