"""`neuraos ask` on the host: the guest agent's RLM loop (`neuraos_agent.rlm`) over the
operator's files, its model calls served by the host's own llama.cpp backend in this process
or by an OpenAI-compatible endpoint named in the config."""
