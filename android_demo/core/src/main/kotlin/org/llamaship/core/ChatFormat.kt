package org.llamaship.core

data class Message(val role: String, val content: String)

/**
 * Prompt formatting for the chat templates llamaship bundles carry. The app cannot run Jinja, so
 * each family is written out by hand; the tests compare every family with what the Python side
 * renders from the real templates (golden file), so the two cannot drift.
 */
enum class ChatFamily {
    LLAMA2, LLAMA3, CHATML, PLAIN;

    companion object {
        fun detect(template: String?): ChatFamily = when {
            template == null -> PLAIN
            "<|start_header_id|>" in template -> LLAMA3
            "<|im_start|>" in template -> CHATML
            "[INST]" in template -> LLAMA2
            else -> PLAIN
        }

        // the newline may be a real one or a Jinja "\n" escape, depending on who wrote the template
        private val chatmlDefaultSystem = Regex("""<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>""")

        /** SmolLM2's template inserts its own system turn when the conversation has none. */
        fun defaultSystemPrompt(template: String?): String? =
            template?.let { chatmlDefaultSystem.find(it)?.groupValues?.get(1) }
    }
}

object ChatFormat {
    fun format(messages: List<Message>, tokenizer: TokenizerInfo): String =
        format(messages, ChatFamily.detect(tokenizer.chatTemplate), tokenizer.bosToken, tokenizer.eosToken,
            ChatFamily.defaultSystemPrompt(tokenizer.chatTemplate))

    fun format(
        messages: List<Message>,
        family: ChatFamily,
        bosToken: String,
        eosToken: String,
        defaultSystem: String? = null,
    ): String {
        val sb = StringBuilder()
        when (family) {
            ChatFamily.LLAMA2 -> for (m in messages) {
                when (m.role) {
                    "user" -> sb.append(bosToken).append("[INST] ").append(m.content).append(" [/INST]")
                    "assistant" -> sb.append(' ').append(m.content).append(' ').append(eosToken)
                }
            }
            ChatFamily.LLAMA3 -> {
                sb.append(bosToken)
                for (m in messages) {
                    sb.append("<|start_header_id|>").append(m.role).append("<|end_header_id|>\n\n")
                        .append(m.content.trim()).append("<|eot_id|>")
                }
                sb.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
            }
            ChatFamily.CHATML -> {
                if (defaultSystem != null && messages.firstOrNull()?.role != "system") {
                    sb.append("<|im_start|>system\n").append(defaultSystem.replace("\\n", "\n")).append("<|im_end|>\n")
                }
                for (m in messages) {
                    sb.append("<|im_start|>").append(m.role).append('\n').append(m.content).append("<|im_end|>\n")
                }
                sb.append("<|im_start|>assistant\n")
            }
            ChatFamily.PLAIN -> messages.forEach { sb.append(it.content) }
        }
        return sb.toString()
    }
}

/**
 * Watches streamed text for the bundle's stop tokens (the runner stops on the .pte's EOS ids, but
 * a template's end-of-turn marker can also arrive as text) and cuts the reply there. Text that
 * could be the beginning of a stop token is held back until the next piece decides it.
 */
class StopDetector(stopTokens: List<String>) {
    private val stops = stopTokens.filter { it.isNotEmpty() }
    private val emitted = StringBuilder()
    private var pending = ""
    var stopped = false
        private set

    /** Feed one streamed piece; returns the text that can be shown now. */
    fun accept(piece: String): String {
        if (stopped) return ""
        pending += piece
        val hit = stops.mapNotNull { t -> pending.indexOf(t).takeIf { it >= 0 } }.minOrNull()
        if (hit != null) {
            stopped = true
            return emit(pending.substring(0, hit))
        }
        val hold = stops.maxOfOrNull { t -> (minOf(t.length - 1, pending.length) downTo 1)
            .firstOrNull { pending.endsWith(t.substring(0, it)) } ?: 0 } ?: 0
        return emit(pending.substring(0, pending.length - hold))
    }

    /** End of generation: release held-back text. */
    fun flush(): String = if (stopped) "" else emit(pending)

    private fun emit(text: String): String {
        pending = pending.substring(text.length)
        if (stopped) pending = ""
        emitted.append(text)
        return text
    }

    val reply: String get() = emitted.toString()
}
