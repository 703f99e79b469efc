package org.llamaship.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test

class GenerationStatsTest {
    /** Recorded from ExecuTorch's TextLLMRunner on SmolLM2-135M 8da4w-g32 on the x86_64 host. */
    private val recorded = "PyTorchObserver {\"prefill_token_per_sec\":263.158,\"decode_token_per_sec\":274.51," +
        "\"prompt_tokens\":5,\"generated_tokens\":14,\"model_load_start_ms\":1795458467464," +
        "\"model_load_end_ms\":1795458467682,\"inference_start_ms\":1795458467682,\"inference_end_ms\":1795458467752," +
        "\"model_execution_start_ms\":1795458467748,\"model_execution_end_ms\":1795458467751," +
        "\"prompt_eval_end_ms\":1795458467701,\"first_token_ms\":1795458467701,\"aggregate_sampling_time_ms\":2," +
        "\"aggregate_model_execution_time_ms\":67,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}"

    @Test fun ratesMatchTheRunnersOwn() {
        val s = GenerationStats.parse(recorded)
        assertEquals(263.158, s.prefillTokPerSec!!, 1e-3)
        assertEquals(274.51, s.decodeTokPerSec!!, 1e-2)
        assertEquals(19, s.ttftMs)
        assertEquals(218, s.loadMs)
        assertTrue(s.summary().contains("decode 274.5 tok/s"))
    }

    @Test fun readsTheSmokeStatsInTheGoldenManifest() {
        val root = Json.parse(Golden.text("manifest.json")) as Map<*, *>
        val stats = (root["smoke_test"] as Map<*, *>)["stats"] as Map<*, *>
        // re-serialize the stats object the Python side stored: the runner's own JSON
        val json = "{" + stats.entries.joinToString(",") { (k, v) -> "\"$k\":$v" } + "}"
        val s = GenerationStats.parse(json)
        assertEquals((stats["prompt_tokens"] as Long), s.promptTokens)
        (stats["decode_token_per_sec"] as? Number)?.let { assertEquals(it.toDouble(), s.decodeTokPerSec!!, 0.01 * it.toDouble()) }
    }

    @Test fun zeroDurationGivesNoRateInsteadOfInfinity() {
        val s = GenerationStats.parse(recorded.replace("1795458467752", "1795458467701"))
        assertNull(s.decodeTokPerSec)
    }

    @Test(expected = IllegalArgumentException::class) fun rejectsNonStats() {
        GenerationStats.parse("{\"hello\": 1}")
    }
}
