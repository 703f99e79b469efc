package org.llamaship.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

class ChatFormatTest {
    @Test fun matchesPythonRenderingOfTheRealTemplates() {
        val cases = Json.parse(Golden.text("chat.json")) as List<*>
        assertTrue(cases.size >= 6)
        for (c in cases) {
            val case = c as Map<*, *>
            val template = case["template"] as String
            val family = ChatFamily.detect(template)
            assertEquals(case["family"], family.name)
            val messages = (case["messages"] as List<*>).map {
                val m = it as Map<*, *>
                Message(m["role"] as String, m["content"] as String)
            }
            val got = ChatFormat.format(messages, family, case["bos_token"] as String, case["eos_token"] as String,
                ChatFamily.defaultSystemPrompt(template))
            assertEquals("${family.name} ${messages.size} messages", case["rendered"], got)
        }
    }

    @Test fun formatsWithTheManifestsTokenizer() {
        val m = BundleManifest.parse(Golden.text("manifest.json"))
        val prompt = ChatFormat.format(listOf(Message("user", "Hi")), m.tokenizer)
        assertTrue(prompt.endsWith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"))
    }

    @Test fun stopDetectorCutsAtStopTokenEvenAcrossPieces() {
        val d = StopDetector(listOf("<|im_end|>", "<|endoftext|>"))
        assertEquals(" Paris", d.accept(" Paris"))
        assertEquals(".", d.accept(".<|im_"))
        assertEquals("", d.accept("end|>\nmore"))
        assertTrue(d.stopped)
        assertEquals(" Paris.", d.reply)
        assertEquals("", d.accept("ignored"))
        val e = StopDetector(listOf("<|im_end|>"))
        assertEquals("a", e.accept("a<"))
        assertEquals("<b", e.accept("b"))  // not a stop token after all: released
        assertEquals("", e.accept("<|im"))
        assertEquals("<|im", e.flush())
        assertEquals("a<b<|im", e.reply)
    }

    @Test fun aHostileTemplateIsNeverExecutedOnlyRecognised() {
        // The app has no template engine: whatever a template holds, it only picks a family, and the
        // prompt holds the messages and that family's fixed markup, nothing from the template.
        val payload = "{{ cycler.__init__.__globals__.os.system('id') }}"
        assertEquals(ChatFamily.PLAIN, ChatFamily.detect(payload))
        val llama3ish = "<|start_header_id|>$payload"
        assertEquals(ChatFamily.LLAMA3, ChatFamily.detect(llama3ish))
        val prompt = ChatFormat.format(listOf(Message("user", "Hi")), ChatFamily.detect(llama3ish), "<s>", "</s>")
        assertTrue(!prompt.contains("cycler") && !prompt.contains("os.system"))
        assertEquals("Hi", ChatFormat.format(listOf(Message("user", "Hi")), ChatFamily.PLAIN, "<s>", "</s>").trim())
    }
}
