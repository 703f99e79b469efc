package org.llamaship.demo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.viewModels
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material3.Button
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import java.io.File

/** Bundles live in /data/local/tmp/llama/<bundle> (adb push) or in the app's external files dir. */
class MainActivity : ComponentActivity() {
    private val vm: ChatViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val roots = listOfNotNull(File("/data/local/tmp/llama"), getExternalFilesDir(null))
        setContent { MaterialTheme { ChatScreen(vm, roots) } }
    }
}

@Composable
fun ChatScreen(vm: ChatViewModel, roots: List<File>) {
    var input by remember { mutableStateOf("") }
    val bundles = remember {
        roots.flatMap { r -> r.listFiles()?.filter { File(it, "manifest.json").isFile } ?: emptyList() }
    }
    Column(Modifier.fillMaxSize().padding(12.dp), verticalArrangement = Arrangement.spacedBy(8.dp)) {
        Text(vm.status.value, style = MaterialTheme.typography.titleSmall)
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            bundles.take(3).forEach { b ->
                Button(onClick = { vm.load(b) }, enabled = !vm.busy.value) { Text(b.name) }
            }
        }
        vm.stats.value?.let { Text(it.summary(), style = MaterialTheme.typography.bodySmall) }
        LazyColumn(Modifier.weight(1f).fillMaxWidth()) {
            items(vm.messages) { m -> Text("${m.role}: ${m.content}", Modifier.padding(vertical = 4.dp)) }
        }
        OutlinedTextField(value = input, onValueChange = { input = it }, modifier = Modifier.fillMaxWidth(),
            label = { Text("Message") })
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(onClick = { vm.send(input); input = "" }, enabled = !vm.busy.value && input.isNotBlank()) { Text("Send") }
            Button(onClick = { vm.stop() }, enabled = vm.busy.value) { Text("Stop") }
            Button(onClick = { vm.reset() }, enabled = !vm.busy.value) { Text("Reset") }
        }
    }
}
