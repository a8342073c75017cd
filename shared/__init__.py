"""Message orchestrator: schedule, pace and deliver SMS for conversational agents."""
