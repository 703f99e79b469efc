package org.llamaship.core

object Golden {
    fun text(name: String): String =
        Golden::class.java.getResource("/golden/$name")?.readText()
            ?: error("golden/$name not on the test classpath; run the Python tests to generate it")
}
