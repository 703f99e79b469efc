package org.llamaship.core

import java.io.File
import java.security.MessageDigest

/** What the app needs from a llamaship bundle's manifest.json, validated on load. */
data class Artifact(val format: String, val path: String, val maxContext: Int, val maxSeqLen: Int)

data class TokenizerInfo(
    val path: String,
    val kind: String,
    val bosId: Int?,
    val addBos: Boolean,
    val bosToken: String,
    val eosToken: String,
    val stopIds: List<Int>,
    val stopTokens: List<String>,
    val chatTemplate: String?,
)

data class FileEntry(val sha256: String, val size: Long)

class ManifestException(message: String) : Exception(message)

data class BundleManifest(
    val schemaVersion: Int,
    val modelName: String,
    val quantName: String,
    val artifacts: List<Artifact>,
    val tokenizer: TokenizerInfo,
    val files: Map<String, FileEntry>,
    val validationPassed: Boolean?,
) {
    /** The artifact the Android app loads with LlmModule. */
    val executorch: Artifact
        get() = artifacts.firstOrNull { it.format == "executorch" }
            ?: throw ManifestException("bundle has no executorch artifact")

    val chatFamily: ChatFamily get() = ChatFamily.detect(tokenizer.chatTemplate)

    /**
     * Re-check files against the manifest: missing, wrong size, and (when [checkSums], which costs
     * a full read of a multi-GB model on a phone) wrong sha256. Empty list = intact.
     */
    fun verify(bundleDir: File, checkSums: Boolean = true): List<String> {
        val problems = ArrayList<String>()
        problems.addAll(verifyDigest(bundleDir))
        for ((name, entry) in files) {
            val f = File(bundleDir, name)
            when {
                !f.isFile -> problems.add("$name: missing")
                f.length() != entry.size -> problems.add("$name: size ${f.length()} != manifest ${entry.size}")
                checkSums && sha256(f) != entry.sha256 -> problems.add("$name: sha256 mismatch")
            }
        }
        return problems
    }

    companion object {
        const val SUPPORTED_SCHEMA = 1
        const val DIGEST_FILE = "manifest.json.sha256"

        /**
         * manifest.json must still hash to the digest written beside it at export (the files'
         * checksums live in the manifest, so this pins all of them). An app that received the
         * bundle digest out of band passes it as [expected] to catch an edited-and-resealed manifest.
         */
        fun verifyDigest(bundleDir: File, expected: String? = null): List<String> {
            val manifest = File(bundleDir, "manifest.json")
            val digestFile = File(bundleDir, DIGEST_FILE)
            if (!manifest.isFile) return listOf("manifest.json: missing")
            val actual = sha256(manifest)
            val problems = ArrayList<String>()
            if (!digestFile.isFile) {
                problems.add("$DIGEST_FILE: missing")
            } else if (digestFile.readText().trim().split(Regex("\\s+")).firstOrNull() != actual) {
                problems.add("manifest.json: changed after export (its sha256 is not the one in $DIGEST_FILE)")
            }
            if (expected != null && expected.lowercase().removePrefix("sha256:") != actual) {
                problems.add("manifest.json: bundle digest $actual is not the expected $expected")
            }
            return problems
        }

        fun load(bundleDir: File): BundleManifest {
            val file = File(bundleDir, "manifest.json")
            if (!file.isFile) throw ManifestException("${file.path}: missing; not a llamaship bundle")
            return parse(file.readText())
        }

        fun parse(text: String): BundleManifest {
            val root = try {
                Json.parse(text) as? Map<*, *> ?: throw ManifestException("manifest is not a JSON object")
            } catch (e: JsonException) {
                throw ManifestException("manifest is not valid JSON: ${e.message}")
            }
            val version = (root["schema_version"] as? Long)?.toInt()
                ?: throw ManifestException("manifest has no schema_version")
            if (version > SUPPORTED_SCHEMA) {
                throw ManifestException("manifest schema $version is newer than this app understands ($SUPPORTED_SCHEMA); update the app")
            }
            val files = (root["files"] as? Map<*, *> ?: throw ManifestException("manifest has no files table"))
                .map { (k, v) ->
                    val name = k as String
                    checkSafePath(name)
                    val e = v as? Map<*, *> ?: throw ManifestException("bad entry for $name")
                    name to FileEntry(e.str("sha256"), (e["size"] as? Long) ?: throw ManifestException("$name: no size"))
                }.toMap()
            val artifacts = (root["artifacts"] as? List<*> ?: emptyList<Any>()).map {
                val a = it as Map<*, *>
                Artifact(a.str("format"), a.str("path"), a.int("max_context"), a.int("max_seq_len"))
            }
            val tok = root["tokenizer"] as? Map<*, *> ?: throw ManifestException("manifest has no tokenizer")
            val tokenizer = TokenizerInfo(
                path = tok.str("path"),
                kind = tok.str("kind"),
                bosId = (tok["bos_id"] as? Long)?.toInt(),
                addBos = tok["add_bos"] as? Boolean ?: false,
                bosToken = tok["bos_token"] as? String ?: "",
                eosToken = tok["eos_token"] as? String ?: "",
                stopIds = (tok["stop_ids"] as? List<*> ?: emptyList<Any>()).map { (it as Long).toInt() },
                stopTokens = (tok["stop_tokens"] as? List<*> ?: emptyList<Any>()).map { it as String },
                chatTemplate = tok["chat_template"] as? String,
            )
            for (p in artifacts.map { it.path } + tokenizer.path) {
                if (p !in files) throw ManifestException("$p is not listed in the manifest's files")
            }
            val model = root["model"] as? Map<*, *> ?: throw ManifestException("manifest has no model")
            val quant = root["quant"] as? Map<*, *>
            val validation = root["validation"] as? Map<*, *>
            return BundleManifest(
                schemaVersion = version,
                modelName = model.str("name"),
                quantName = quant?.get("name") as? String ?: "unknown",
                artifacts = artifacts,
                tokenizer = tokenizer,
                files = files,
                validationPassed = validation?.get("passed") as? Boolean,
            )
        }

        /** Reject `../` and absolute paths: a manifest must never point outside its bundle. */
        fun checkSafePath(name: String) {
            if (name.isEmpty() || name.startsWith("/") || name.startsWith("\\") ||
                name.split('/', '\\').any { it == ".." } || Regex("^[A-Za-z]:").containsMatchIn(name)
            ) {
                throw ManifestException("unsafe path in manifest: '$name'")
            }
        }

        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            f.inputStream().use { input ->
                val buf = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(buf)
                    if (n < 0) break
                    md.update(buf, 0, n)
                }
            }
            return md.digest().joinToString("") { "%02x".format(it) }
        }

        private fun Map<*, *>.str(key: String): String =
            this[key] as? String ?: throw ManifestException("manifest field '$key' is missing or not a string")

        private fun Map<*, *>.int(key: String): Int =
            (this[key] as? Long)?.toInt() ?: throw ManifestException("manifest field '$key' is missing or not an integer")
    }
}
