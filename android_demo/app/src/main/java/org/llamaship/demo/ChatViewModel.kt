package org.llamaship.demo

import androidx.compose.runtime.mutableStateListOf
import androidx.compose.runtime.mutableStateOf
import androidx.lifecycle.ViewModel
import org.llamaship.core.BundleManifest
import org.llamaship.core.ChatFormat
import org.llamaship.core.GenerationStats
import org.llamaship.core.Message
import org.llamaship.core.StopDetector
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmGenerationConfig
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File
import kotlin.concurrent.thread

/**
 * Loads a bundle with ExecuTorch's LlmModule and runs chat turns. Everything that is not UI or
 * JNI (manifest, prompt format, stop tokens, stats) is done by :core, which is unit-tested on the
 * JVM; this class only wires it to LlmModule.
 */
class ChatViewModel : ViewModel() {
    val messages = mutableStateListOf<Message>()
    val status = mutableStateOf("No bundle loaded")
    val stats = mutableStateOf<GenerationStats?>(null)
    val busy = mutableStateOf(false)

    private var module: LlmModule? = null
    private var manifest: BundleManifest? = null

    fun load(bundleDir: File) {
        busy.value = true
        thread(name = "llamaship-load") {
            try {
                val m = BundleManifest.load(bundleDir)
                // sizes only: hashing a multi-GB model on a phone takes too long for app start
                val problems = m.verify(bundleDir, checkSums = false)
                if (problems.isNotEmpty()) error("bundle damaged: ${problems.first()}")
                module?.close()
                val llm = LlmModule(
                    File(bundleDir, m.executorch.path).absolutePath,
                    File(bundleDir, m.tokenizer.path).absolutePath,
                    0.0f,
                )
                llm.load()
                module = llm
                manifest = m
                messages.clear()
                status.value = "${m.modelName} [${m.quantName}] loaded"
            } catch (e: Exception) {
                status.value = "Load failed: ${e.message}"
            } finally {
                busy.value = false
            }
        }
    }

    fun send(text: String) {
        val llm = module ?: return
        val m = manifest ?: return
        messages.add(Message("user", text))
        val prompt = ChatFormat.format(messages.toList(), m.tokenizer)
        messages.add(Message("assistant", ""))
        val detector = StopDetector(m.tokenizer.stopTokens)
        busy.value = true
        thread(name = "llamaship-generate") {
            val config = LlmGenerationConfig.create()
                .seqLen(m.executorch.maxContext)
                .echo(false)
                .temperature(0.0f)
                .numBos(if (m.tokenizer.addBos && !prompt.startsWith(m.tokenizer.bosToken)) 1 else 0)
                .build()
            try {
                llm.generate(prompt, config, object : LlmCallback {
                    override fun onResult(result: String) {
                        val shown = detector.accept(result)
                        if (detector.stopped) llm.stop()
                        if (shown.isNotEmpty()) appendToReply(shown)
                    }

                    override fun onStats(stats: String) {
                        this@ChatViewModel.stats.value = runCatching { GenerationStats.parse(stats) }.getOrNull()
                    }
                })
                appendToReply(detector.flush())
            } catch (e: Exception) {
                status.value = "Generation failed: ${e.message}"
            } finally {
                busy.value = false
            }
        }
    }

    fun stop() = module?.stop()

    fun reset() {
        module?.resetContext()
        messages.clear()
        stats.value = null
    }

    private fun appendToReply(piece: String) {
        if (piece.isEmpty()) return
        val last = messages.last()
        messages[messages.lastIndex] = last.copy(content = last.content + piece)
    }

    override fun onCleared() {
        module?.close()
    }
}
