package org.llamaship.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.nio.file.Files

class BundleManifestTest {
    private val goldenText = Golden.text("manifest.json")
    private val golden = BundleManifest.parse(goldenText)
    private val raw = Json.parse(goldenText) as Map<*, *>

    @Test fun readsTheManifestThePythonSideWrites() {
        assertEquals(1, golden.schemaVersion)
        assertEquals("model.pte", golden.executorch.path)
        val tok = raw["tokenizer"] as Map<*, *>
        assertEquals(tok["path"], golden.tokenizer.path)
        assertEquals((tok["stop_ids"] as List<*>).map { (it as Long).toInt() }, golden.tokenizer.stopIds)
        assertEquals(golden.tokenizer.stopIds.size, golden.tokenizer.stopTokens.size)
        assertTrue(golden.tokenizer.stopTokens.contains("<|im_end|>"))
        assertEquals(ChatFamily.CHATML, golden.chatFamily)
        assertEquals(128, golden.executorch.maxContext)
        assertTrue(golden.files.containsKey("model.pte") && golden.files.containsKey("report.json"))
        assertEquals(true, golden.validationPassed)
        assertTrue(golden.quantName.startsWith("8da4w-g32"))
    }

    private fun rejects(text: String, expected: String) {
        try {
            BundleManifest.parse(text)
            fail("expected rejection: $expected")
        } catch (e: ManifestException) {
            assertTrue("'${e.message}' should mention '$expected'", e.message!!.contains(expected))
        }
    }

    @Test fun rejectsNewerSchema() = rejects(goldenText.replace("\"schema_version\": 1", "\"schema_version\": 99"), "newer")

    @Test fun rejectsZipSlipAndAbsolutePaths() {
        rejects(goldenText.replace("\"tokenizer.json\": {", "\"../evil.json\": {"), "unsafe path")
        rejects(goldenText.replace("\"tokenizer.json\": {", "\"/etc/passwd\": {"), "unsafe path")
    }

    @Test fun rejectsArtifactNotListedInFiles() =
        rejects(goldenText.replace("\"path\": \"model.pte\"", "\"path\": \"other.pte\""), "not listed")

    @Test fun rejectsGarbage() {
        rejects("{\"schema_version\": 1", "not valid JSON")
        rejects("[]", "not a JSON object")
        rejects("{}", "schema_version")
    }

    @Test fun verifyFindsMissingResizedAndFlippedFiles() {
        val dir = Files.createTempDirectory("bundle").toFile()
        val content = "hello bundle".toByteArray()
        File(dir, "a.bin").writeBytes(content)
        File(dir, "b.bin").writeBytes(content)
        File(dir, "c.bin").writeBytes(content)
        seal(dir, goldenText)
        val sha = BundleManifest.sha256(File(dir, "a.bin"))
        assertEquals(64, sha.length)
        val m = golden.copy(files = mapOf(
            "a.bin" to FileEntry(sha, content.size.toLong()),
            "b.bin" to FileEntry(sha, content.size.toLong() + 1),
            "c.bin" to FileEntry(sha.replaceRange(0, 1, if (sha[0] == '0') "1" else "0"), content.size.toLong()),
            "d.bin" to FileEntry(sha, 1),
        ))
        val problems = m.verify(dir)
        assertEquals(3, problems.size)
        assertTrue(problems[0].startsWith("b.bin: size 12 != manifest 13"))
        assertEquals("c.bin: sha256 mismatch", problems[1])
        assertEquals("d.bin: missing", problems[2])
        assertNotNull(m.verify(dir, checkSums = false).find { it.startsWith("b.bin") })
        assertTrue(m.verify(dir, checkSums = false).none { it.startsWith("c.bin") })
    }

    private fun seal(dir: File, manifest: String) {
        File(dir, "manifest.json").writeText(manifest)
        File(dir, BundleManifest.DIGEST_FILE).writeText("${BundleManifest.sha256(File(dir, "manifest.json"))}  manifest.json\n")
    }

    @Test fun digestCatchesAnEditedManifest() {
        val dir = Files.createTempDirectory("bundle").toFile()
        seal(dir, goldenText)
        val digest = BundleManifest.sha256(File(dir, "manifest.json"))
        assertEquals(emptyList<String>(), BundleManifest.verifyDigest(dir, "sha256:$digest"))
        // edited alone: the digest file disagrees
        File(dir, "manifest.json").writeText(goldenText.replace("<|im_end|>", "<|evil|>"))
        assertTrue(BundleManifest.verifyDigest(dir).single().contains("changed after export"))
        // edited and resealed: only the digest kept from export catches it
        seal(dir, goldenText.replace("<|im_end|>", "<|evil|>"))
        assertEquals(emptyList<String>(), BundleManifest.verifyDigest(dir))
        assertTrue(BundleManifest.verifyDigest(dir, digest).single().contains("is not the expected"))
        File(dir, BundleManifest.DIGEST_FILE).delete()
        assertTrue(BundleManifest.verifyDigest(dir).single().contains("missing"))
    }
}
