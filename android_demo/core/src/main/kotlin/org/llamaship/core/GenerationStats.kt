package org.llamaship.core

/**
 * The runner's stats JSON (LlmCallback.onStats on Android, the `PyTorchObserver {...}` line of
 * llama_main, the Python binding's Stats.to_json_string) and the rates derived from it with the
 * runner's own formulas, so phone and host figures are computed identically.
 */
data class GenerationStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val modelLoadStartMs: Long,
    val modelLoadEndMs: Long,
    val inferenceStartMs: Long,
    val promptEvalEndMs: Long,
    val firstTokenMs: Long,
    val inferenceEndMs: Long,
) {
    val loadMs: Long get() = modelLoadEndMs - modelLoadStartMs
    val ttftMs: Long get() = firstTokenMs - inferenceStartMs

    /** prompt tokens / prefill time; null when the clock (1 ms) saw no time pass. */
    val prefillTokPerSec: Double?
        get() = rate(promptTokens, promptEvalEndMs - inferenceStartMs)

    /** generated tokens / time from end of prefill to end of inference, as the runner reports. */
    val decodeTokPerSec: Double?
        get() = rate(generatedTokens, inferenceEndMs - promptEvalEndMs)

    private fun rate(tokens: Long, ms: Long): Double? = if (ms <= 0) null else tokens * 1000.0 / ms

    fun summary(): String = "TTFT $ttftMs ms, prefill ${fmt(prefillTokPerSec)} tok/s, decode ${fmt(decodeTokPerSec)} tok/s " +
        "($promptTokens prompt, $generatedTokens generated; load $loadMs ms)"

    private fun fmt(v: Double?) = v?.let { "%.1f".format(it) } ?: "-"

    companion object {
        private const val PREFIX = "PyTorchObserver "

        fun parse(text: String): GenerationStats {
            val json = text.trim().removePrefix(PREFIX)
            val m = try {
                Json.parse(json) as? Map<*, *>
            } catch (e: JsonException) {
                null
            } ?: throw IllegalArgumentException("not a runner stats JSON object: ${text.take(80)}")

            fun long(k: String): Long = (m[k] as? Number)?.toLong()
                ?: throw IllegalArgumentException("runner stats lack '$k'")
            return GenerationStats(
                promptTokens = long("prompt_tokens"),
                generatedTokens = long("generated_tokens"),
                modelLoadStartMs = long("model_load_start_ms"),
                modelLoadEndMs = long("model_load_end_ms"),
                inferenceStartMs = long("inference_start_ms"),
                promptEvalEndMs = long("prompt_eval_end_ms"),
                firstTokenMs = (m["first_token_ms"] as? Number)?.toLong() ?: long("prompt_eval_end_ms"),
                inferenceEndMs = long("inference_end_ms"),
            )
        }
    }
}
